"""EngineLoop's promotion pass: oldest waiters first, and no thrashing when adapters outnumber slots."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_plane.engine.request import SamplingParams
from data_plane.lora.cpu_cache import CpuCache
from data_plane.lora.slot_table import SlotTable
from data_plane.server.engine_loop import EngineLoop
from tests.factories import make_peft_adapter, make_tiny_model
from tests.unit.engine_helpers import make_engine, normalized


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("loop")
    model = make_tiny_model(root / "model")
    adapters = {f"k{i}": normalized(model, make_peft_adapter(model, root / f"a{i}", r=4, seed=i)) for i in range(5)}
    return model, adapters


def test_crowded_queue_does_not_evict_what_older_waiters_need(setup):
    model, adapters = setup
    engine = make_engine(model, max_loras=2, max_num_seqs=1)  # one request at a time: the rest wait
    cpu = CpuCache(8, 1 << 30)
    for key, adapter in adapters.items():
        cpu.put(key, adapter)
    slots = SlotTable(2, 0)
    loads = []
    loop = EngineLoop(engine, cpu, slots, on_promote=lambda key, _s, _victim: loads.append(key))
    for i, key in enumerate(["k0", "k1", "k2", "k3", "k4"]):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), key, request_id=f"r{i}")
    loop._promote_waiting()  # engine-thread method, called directly: the thread is not started
    assert sorted(slots.keys()) == ["k0", "k1"]  # the two oldest waiters' adapters, not the last placed
    while engine.has_unfinished():
        loop._promote_waiting()
        engine.step()
    assert loads == ["k0", "k1", "k2", "k3", "k4"]  # every adapter loaded exactly once: no thrashing
