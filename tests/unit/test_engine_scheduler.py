"""Scheduling: KV budget, preemption, adapter slots and residency, abort, limits."""

from __future__ import annotations

import pytest

from data_plane.engine.request import FinishReason, RequestStatus, SamplingParams
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R
from tests.unit.engine_helpers import (  # noqa: F401 - fixtures
    artifacts,
    make_engine,
    normalized,
    one_thread,
    random_prompts,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(artifacts):  # noqa: F811
    model = artifacts.model("llama")
    adapters = {name: artifacts.adapter(model, r=4 * (i + 1), alpha=8, seed=10 + i,
                                        target_modules=("q_proj", "v_proj", "down_proj"))
                for i, name in enumerate(["a", "b", "c"])}
    return model, adapters


def drain(engine, batches=None):
    """Step until nothing can run; tokens and finish reason per request id; optionally record batches."""
    if batches is not None:
        run = engine.runner.run

        def recording(batch):
            batches.append(batch)
            return run(batch)

        engine.runner.run = recording
    tokens, reasons = {}, {}
    while outputs := engine.step():
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return tokens, reasons


def test_preemption_under_tiny_kv_budget_gives_identical_output(setup):
    model, adapters = setup
    prompts = random_prompts([20, 9, 31, 14, 5, 26], seed=11)
    names = ["a", None, "b", "c", None, "a"]
    roomy = make_engine(model, adapters)
    ids = [roomy.add_request(p, GREEDY, n) for p, n in zip(prompts, names, strict=True)]
    expected, _ = drain(roomy)
    # 8 blocks of 8 tokens: one request of max_model_len 64 fits, the six together (~190 tokens) do not.
    tight = make_engine(model, adapters, num_kv_blocks=8, kv_block_size=8, max_model_len=64)
    ids_tight = [tight.add_request(p, GREEDY, n) for p, n in zip(prompts, names, strict=True)]
    got, reasons = drain(tight)
    assert tight.scheduler.num_preemptions > 0
    assert tight.blocks.peak_used <= 8 and tight.blocks.num_used == 0
    assert [got[i] for i in ids_tight] == [expected[i] for i in ids]
    assert set(reasons.values()) == {FinishReason.LENGTH}


def test_kv_budget_in_bytes_is_honoured(setup):
    model, _ = setup
    engine = make_engine(model, kv_cache_bytes=300_000, kv_block_size=16)
    # 2 layers x 2 (K, V) x 16 tokens x 2 kv heads x 16 dims x 4 bytes = 8 KiB a block
    assert engine.blocks.num_blocks == 300_000 // 8192
    assert engine.kv.nbytes <= 300_000
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        make_engine(model, kv_cache_bytes=8192 * 3, max_model_len=128)


def test_admission_is_bounded_by_kv_capacity(setup):
    model, _ = setup
    engine = make_engine(model, num_kv_blocks=4, kv_block_size=16, max_model_len=64)
    for p in random_prompts([30] * 5, seed=12):
        engine.add_request(p, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    assert len(engine.scheduler.running) == 2  # two blocks each: the cache holds two
    assert len(engine.scheduler.waiting) == 3
    drain(engine)
    assert engine.blocks.num_free == 4


def test_max_loras_bounds_distinct_adapters_and_busy_adapter_is_not_evicted(setup):
    model, adapters = setup
    engine = make_engine(model, {"a": adapters["a"], "b": adapters["b"]}, max_loras=2)
    prompts = random_prompts([8, 8, 8, 8, 8], seed=13)
    for p, name in zip(prompts, ["a", "c", "b", None, "a"], strict=True):
        engine.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True), name)
    engine.step()
    assert engine.waiting_adapters() == ["c"]
    assert engine.adapters_in_use() == {"a", "b"}
    with pytest.raises(LoraplaneError) as err:
        engine.evict_adapter("a")
    assert err.value.reason == R.ERROR_REASON_CAPACITY_EXHAUSTED
    with pytest.raises(LoraplaneError):
        engine.load_adapter("c", 0, normalized(model, adapters["c"]))  # slot 0 holds busy "a"
    assert engine.adapter_slots == {"a": 0, "b": 1}
    batches = []
    drain(engine, batches)  # "c" never gets a slot here: the others finish, it keeps waiting
    assert engine.scheduler.waiting and engine.scheduler.waiting[0].adapter == "c"
    assert all(len(b.adapters) <= 2 for b in batches)
    engine.evict_adapter("a")
    engine.load_adapter("c", 0, normalized(model, adapters["c"]))
    tokens, reasons = drain(engine, batches)
    assert list(reasons.values()) == [FinishReason.LENGTH] and len(next(iter(tokens.values()))) == 6


def test_non_resident_adapter_waits_without_blocking_others(setup):
    model, adapters = setup
    engine = make_engine(model, {"a": adapters["a"]}, max_loras=2)
    prompts = random_prompts([10, 12, 7], seed=14)
    late = engine.add_request(prompts[0], GREEDY, "b")  # first in line, adapter not loaded
    others = [engine.add_request(prompts[1], GREEDY, "a"), engine.add_request(prompts[2], GREEDY, None)]
    tokens, reasons = drain(engine)
    assert set(reasons) == set(others)
    assert late not in tokens and engine.scheduler.waiting[0].status is RequestStatus.WAITING
    engine.load_adapter("b", 1, normalized(model, adapters["b"]))
    tokens, _ = drain(engine)
    reference = make_engine(model, {"b": adapters["b"]})
    rid = reference.add_request(prompts[0], GREEDY, "b")
    expected, _ = drain(reference)
    assert tokens[late] == expected[rid]


def test_abort_frees_kv_and_reports_abort(setup):
    model, adapters = setup
    engine = make_engine(model, {"a": adapters["a"]}, max_num_seqs=1)
    running = engine.add_request(random_prompts([20])[0], GREEDY, "a")
    waiting = engine.add_request(random_prompts([5])[0], GREEDY)
    engine.step()
    assert engine.blocks.num_used == 2 and engine.adapters_in_use() == {"a"}
    assert engine.abort(running) and engine.abort(waiting)
    assert not engine.abort("no-such-request")
    assert engine.blocks.num_used == 0 and engine.adapters_in_use() == set()
    outs = engine.step()
    assert {(o.request_id, o.finish_reason, o.finished) for o in outs} == {
        (running, FinishReason.ABORT, True), (waiting, FinishReason.ABORT, True)}
    assert not engine.has_unfinished()
    engine.evict_adapter("a")  # no longer in use


def test_max_model_len_and_max_num_seqs(setup):
    model, _ = setup
    engine = make_engine(model, max_model_len=32, max_num_seqs=2)
    ids = [engine.add_request(p, SamplingParams(max_tokens=100, ignore_eos=True))
           for p in random_prompts([28, 30, 32], seed=15)]
    batches = []
    tokens, reasons = drain(engine, batches)
    assert [len(tokens[i]) for i in ids] == [4, 2, 1]  # prompt + output reaches max_model_len
    assert all(reasons[i] is FinishReason.LENGTH for i in ids)
    assert max(len(b.requests) for b in batches) == 2


def test_every_batch_is_grouped_by_slot_with_base_first(setup):
    model, adapters = setup
    prompts = random_prompts([7, 12, 5, 9, 11, 6, 8], seed=21)
    names = ["c", None, "a", "c", "b", None, "a"]
    engine = make_engine(model, adapters)
    for p, n in zip(prompts, names, strict=True):
        engine.add_request(p, GREEDY, n)
    batches = []
    drain(engine, batches)
    assert batches and any(b.num_prefills < len(b.requests) for b in batches)
    for batch in batches:
        slots = [r.lora_slot for r in batch.requests]
        assert slots == sorted(slots), slots  # each adapter's tokens are contiguous rows
    first = [r.adapter for r in batches[0].requests]
    assert len(first) == len(names) and first[:2] == [None, None]
    # Each adapter's requests are next to each other, whatever order they arrived in.
    runs = [name for i, name in enumerate(first) if i == 0 or first[i - 1] != name]
    assert len(runs) == len(set(runs)) == 4, first
