"""The CPU tier's holding rules, in particular the put-and-hold a waiting request relies on."""

from __future__ import annotations

import torch

from data_plane.lora.cpu_cache import CpuCache
from loraplane.adapter_format import NormalizedAdapter


def adapter(seed: int) -> NormalizedAdapter:
    g = torch.Generator().manual_seed(seed)
    return NormalizedAdapter({"layers.0.q_proj.lora_A": torch.randn(4, 8, generator=g),
                              "layers.0.q_proj.lora_B": torch.randn(8, 4, generator=g)}, 4, ("q_proj",), "float32")


def test_a_loaded_adapter_is_evicted_by_the_next_release_unless_put_and_held_in_one_step():
    # Capacity 1 with "a" held by a running request: a loaded "b" sits over budget, unheld.
    cpu = CpuCache(1, 1 << 30)
    cpu.put("a", adapter(0))
    assert cpu.acquire("a") and cpu.acquire("a")
    assert cpu.put("b", adapter(1)) == []         # kept: nothing else can go
    assert cpu.release("a") == ["b"]               # the window a waiting request lost it in
    assert not cpu.acquire("b")
    # put(hold=True), what AdapterCache.acquire does after a load: inserted and held at once.
    assert cpu.put("b", adapter(1), hold=True) == []
    assert cpu.release("a") == ["a"]               # now "a" is the unheld one over budget
    assert cpu.refs("b") == 1 and cpu.keys() == ["b"]
    assert cpu.put("b", adapter(1), hold=True) == [] and cpu.refs("b") == 2  # a second waiter, same entry
    assert cpu.release("b") == [] and cpu.release("b") == [] and cpu.keys() == ["b"]  # within budget
