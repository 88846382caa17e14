"""EngineLoop: the promotion pass (oldest waiters first, no thrashing, an unloadable adapter failing
only its own requests), and building the engine in its thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from data_plane.engine.request import FinishReason, SamplingParams
from data_plane.lora.cpu_cache import CpuCache
from data_plane.lora.slot_table import SlotTable
from data_plane.server.engine_loop import EngineLoop
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R
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


def test_an_adapter_no_slot_can_hold_fails_its_requests_and_the_others_still_get_slots(setup, tmp_path):
    model, adapters = setup
    engine = make_engine(model, max_loras=1, max_lora_rank=4)
    cpu = CpuCache(8, 1 << 30)
    cpu.put("big", normalized(model, make_peft_adapter(model, tmp_path / "big", r=8, seed=9)))  # rank 8 > 4
    cpu.put("k0", adapters["k0"])
    slots = SlotTable(1, 0)
    loop = EngineLoop(engine, cpu, slots)
    events = asyncio.new_event_loop()
    streams = {}
    for rid, key in (("older", "big"), ("younger", "k0")):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), key, request_id=rid)
        streams[rid] = asyncio.Queue()
        loop._streams[rid] = (events, streams[rid])
    try:
        loop._promote_waiting()  # engine-thread method, called directly: the thread is not started
        assert slots.keys() == ["k0"]  # the younger request's adapter was not held up behind it
        error = events.run_until_complete(streams["older"].get())
        assert isinstance(error, LoraplaneError) and error.reason == R.ERROR_REASON_RANK_TOO_LARGE
        assert [r.request_id for r in engine.scheduler.waiting] == ["younger"]
        while engine.has_unfinished():
            loop._dispatch(engine.step())
        outputs = [events.run_until_complete(streams["younger"].get()) for _ in range(2)]
        assert outputs[-1].finished and sum(len(o.token_ids) for o in outputs) == 2
        assert streams["older"].empty() and not loop._streams
    finally:
        events.close()


def test_a_request_aborted_just_before_a_failed_step_still_gets_its_final_output(setup):
    model, _ = setup
    loop = EngineLoop(make_engine(model, max_loras=1), CpuCache(2, 1 << 30), SlotTable(1, 0))
    loop.start()

    def fail_next_step_after_aborting(engine):
        engine.abort("aborted")
        real_run = engine.runner.run

        def fail_once(batch):  # a fault in the step that follows the abort, as a device error would be
            engine.runner.run = real_run
            raise RuntimeError("injected device fault")

        engine.runner.run = fail_once

    async def scenario():
        sampling = SamplingParams(max_tokens=100, ignore_eos=True)
        aborted = await loop.submit([1, 2, 3], sampling, None, "aborted")
        running = await loop.submit([4, 5, 6], sampling, None, "running")
        await asyncio.wait_for(running.get(), 60)  # both are running
        await loop.acall(fail_next_step_after_aborting)
        failed = await asyncio.wait_for(running.get(), 60)
        while not isinstance(failed, LoraplaneError) and not failed.finished:  # tokens of earlier steps
            failed = await asyncio.wait_for(running.get(), 60)
        outputs = [await asyncio.wait_for(aborted.get(), 60)]
        while not outputs[-1].finished:
            outputs.append(await asyncio.wait_for(aborted.get(), 60))
        return failed, outputs[-1]

    try:
        failed, last = asyncio.run(scenario())
        assert isinstance(failed, LoraplaneError) and failed.reason == R.ERROR_REASON_ENGINE_FAILURE
        assert last.finish_reason is FinishReason.ABORT  # before the fix it was lost with the failed step
        assert loop.call(lambda _e: dict(loop._streams)).result(60) == {}  # no stream left open
    finally:
        loop.stop()


def test_an_engine_that_cannot_clean_up_after_a_failed_step_fails_everything_at_once(setup):
    model, _ = setup
    engine = make_engine(model, max_loras=1)
    loop = EngineLoop(engine, CpuCache(2, 1 << 30), SlotTable(1, 0))
    loop.start()

    def break_engine(engine):  # the step fails, and so does the abort that cleans up after it
        def fault(*_args, **_kw):
            raise RuntimeError("injected device fault")

        engine.runner.run = fault
        engine.abort = fault

    async def scenario():
        sampling = SamplingParams(max_tokens=1000, ignore_eos=True)
        running = await loop.submit([1, 2, 3], sampling, None, "running")
        await asyncio.wait_for(running.get(), 60)
        await loop.acall(break_engine)
        out = await asyncio.wait_for(running.get(), 60)
        while not isinstance(out, LoraplaneError):  # tokens of the steps before the fault
            out = await asyncio.wait_for(running.get(), 60)
        # Before the fix the engine thread died with the exception: this call waited forever.
        with pytest.raises(LoraplaneError) as later:
            await asyncio.wait_for(loop.submit([4, 5], sampling, None, "later"), 10)
        return out, later.value

    try:
        failed, later = asyncio.run(scenario())
        assert failed.reason == later.reason == R.ERROR_REASON_ENGINE_FAILURE
        assert loop.broken is later and not loop._streams
    finally:
        loop.stop()


def test_build_and_start_builds_in_the_engine_thread_and_serves(setup):
    model, _ = setup
    built_in = []

    def build():
        built_in.append(threading.current_thread().name)
        return make_engine(model, max_loras=2)

    loop = EngineLoop.build_and_start(build, CpuCache(2, 1 << 30), SlotTable(2, 0))
    try:
        assert built_in == ["engine-loop"]  # the thread that steps it, not the caller's
        done = loop.call(lambda engine: engine.generate([[1, 2, 3]], None, SamplingParams(max_tokens=3,
                                                                                            ignore_eos=True)))
        [completion] = done.result(timeout=60)
        assert len(completion.token_ids) == 3
    finally:
        loop.stop()


def test_build_and_start_raises_what_the_build_raised():
    def build():
        raise ValueError("no such model directory")

    with pytest.raises(ValueError, match="no such model directory"):
        EngineLoop.build_and_start(build, CpuCache(2, 1 << 30), SlotTable(2, 0))


def test_steps_that_only_feed_prompt_chunks_do_not_idle(setup):
    model, _ = setup
    engine = make_engine(model, max_loras=1, max_num_batched_tokens=4)
    loop = EngineLoop(engine, CpuCache(2, 1 << 30), SlotTable(1, 0))
    waits = []
    drain = loop._drain_commands
    loop._drain_commands = lambda block: waits.append(block) or drain(block=False)
    engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=2, ignore_eos=True), request_id="long")
    while engine.has_unfinished():
        loop._iteration()  # engine-thread method, called directly: the thread is not started
    assert loop.steps == 8 + 1  # 29 prompt tokens in chunks of 4, then one decode
    assert not any(waits)  # a step that fed only a chunk still made progress: no idle wait after it
