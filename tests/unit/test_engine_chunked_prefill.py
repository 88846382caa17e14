"""Chunked prefill: prompts longer than what a step has left are fed over several steps, and the
results stay identical to HF transformers + PEFT."""

from __future__ import annotations

import pytest
import torch

from data_plane.engine.request import SamplingParams
from tests.unit.engine_helpers import (  # noqa: F401 - fixtures
    HFOracle,
    artifacts,
    make_engine,
    one_thread,
    random_prompts,
    record_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def record_batches(engine) -> list:
    batches = []
    run = engine.runner.run
    engine.runner.run = lambda batch: batches.append(batch) or run(batch)
    return batches


def drain(engine, tokens: dict[str, list[int]]) -> None:
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)


@pytest.fixture(scope="module")
def llama(artifacts):  # noqa: F811
    model = artifacts.model("llama")
    return model, {
        "all": artifacts.adapter(model, r=8, alpha=16, target_modules=ALL, seed=21),
        "qv": artifacts.adapter(model, r=4, alpha=4, target_modules=("q_proj", "v_proj"), seed=22),
    }


@pytest.mark.parametrize("budget", [7, 3])  # 3: decodes leave one-token chunks, which take the decode path
def test_prompts_fed_in_chunks_match_hf(llama, budget):
    model, adapters = llama
    engine = make_engine(model, adapters, max_num_batched_tokens=budget)
    prompts = random_prompts([30, 17, 5, 12], seed=23)
    names = ["all", None, "qv", "all"]
    seen = record_logits(engine)
    batches = record_batches(engine)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    ids = [engine.add_request(p, params, a) for p, a in zip(prompts, names, strict=True)]
    tokens: dict[str, list[int]] = {}
    drain(engine, tokens)
    # Every step stays within the budget, and prompts were split: some steps fed part of a prompt.
    assert all(sum(b.num_new) <= budget for b in batches)
    assert any(not all(b.sample) for b in batches)
    assert max(max(b.num_new) for b in batches) == budget
    if budget == 3:
        assert any(n == 1 and not s for b in batches for n, s in zip(b.num_new, b.sample, strict=True))
    expected = HFOracle(model, adapters).generate(prompts, names, 6)
    assert [tokens[i] for i in ids] == [t for t, _ in expected]
    for i, (_, logits) in zip(ids, expected, strict=True):
        torch.testing.assert_close(torch.stack(seen[i]), logits, atol=2e-4, rtol=1e-4)
    assert engine.blocks.num_used == 0


def test_a_long_prompt_does_not_stall_running_decodes(llama):
    model, adapters = llama
    engine = make_engine(model, adapters, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first = [engine.add_request(p, params, a) for p, a in zip(random_prompts([3, 4], seed=24), ["qv", None],
                                                                 strict=True)]
    tokens: dict[str, list[int]] = {}
    for _ in range(2):
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    long_prompt = random_prompts([60], seed=25)[0]
    batches = record_batches(engine)
    late = engine.add_request(long_prompt, SamplingParams(max_tokens=4, ignore_eos=True), "all")
    for _ in range(5):  # the two decodes keep a token each; the prompt gets the other 6 of 8
        outputs = engine.step()
        assert {o.request_id for o in outputs} == set(first)
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert [sorted(b.num_new) for b in batches] == [[1, 1, 6]] * 5
    drain(engine, tokens)
    oracle = HFOracle(model, adapters)
    assert tokens[late] == oracle.generate([long_prompt], ["all"], 4)[0][0]
    assert [tokens[i] for i in first] == [t for t, _ in oracle.generate(random_prompts([3, 4], seed=24),
                                                                          ["qv", None], 12)]


def test_chunks_respect_the_sliding_window(artifacts):  # noqa: F811
    model = artifacts.model("mistral", sliding_window=8)
    engine = make_engine(model, max_num_batched_tokens=5)
    prompts = random_prompts([40, 13], seed=26)
    seen = record_logits(engine)
    ids = [engine.add_request(p, SamplingParams(max_tokens=5, ignore_eos=True)) for p in prompts]
    tokens: dict[str, list[int]] = {}
    drain(engine, tokens)
    expected = HFOracle(model).generate(prompts, [None, None], 5)
    assert [tokens[i] for i in ids] == [t for t, _ in expected]
    for i, (_, logits) in zip(ids, expected, strict=True):
        torch.testing.assert_close(torch.stack(seen[i]), logits, atol=2e-4, rtol=1e-4)


def test_preemption_mid_prompt_recomputes_and_gives_identical_output(llama):
    model, adapters = llama
    prompts = random_prompts([20, 9, 31, 14, 26], seed=27)
    names = ["all", None, "qv", "all", None]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    roomy = make_engine(model, adapters)
    ids = [roomy.add_request(p, params, n) for p, n in zip(prompts, names, strict=True)]
    expected: dict[str, list[int]] = {}
    drain(roomy, expected)
    # 9 blocks of 8 tokens: a long prompt is still being fed when decodes run out of blocks.
    tight = make_engine(model, adapters, num_kv_blocks=9, kv_block_size=8, max_model_len=64,
                        max_num_batched_tokens=6)
    preempted_mid_prompt = []
    preempt = tight.scheduler._preempt

    def watching(request):
        preempted_mid_prompt.append(request.num_uncomputed_tokens > 1)
        preempt(request)

    tight.scheduler._preempt = watching
    ids_tight = [tight.add_request(p, params, n) for p, n in zip(prompts, names, strict=True)]
    got: dict[str, list[int]] = {}
    drain(tight, got)
    assert any(preempted_mid_prompt)
    assert tight.blocks.peak_used <= 9 and tight.blocks.num_used == 0
    assert [got[i] for i in ids_tight] == [expected[i] for i in ids]


def test_the_data_plane_flag_sets_the_step_budget(monkeypatch):
    from data_plane.server.config import DataPlaneConfig, from_args
    from loraplane.cli import build_parser

    monkeypatch.delenv("LORAPLANE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("LORAPLANE_DISTRIBUTION_TOKEN", raising=False)
    base = ["data-plane", "--model", "m", "--control-plane", "127.0.0.1:1"]
    parser = build_parser()
    assert from_args(parser.parse_args([*base, "--max-num-batched-tokens", "256"])).max_num_batched_tokens == 256
    assert from_args(parser.parse_args(base)).max_num_batched_tokens is None
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        from_args(parser.parse_args([*base, "--max-num-batched-tokens", "0"]))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        DataPlaneConfig(model="m", control_plane="127.0.0.1:1", max_num_batched_tokens=True)


def test_generate_runs_through_steps_that_yield_no_token(llama):
    model, adapters = llama
    prompts = random_prompts([25, 11], seed=28)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    chunked = make_engine(model, adapters, max_num_batched_tokens=4).generate(prompts, ["all", None], params)
    whole = make_engine(model, adapters).generate(prompts, ["all", None], params)
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]


def test_decode_rows_gather_only_the_blocks_written_so_far(llama):
    """A prompt fed one token a step takes the decode path; its reserved but unwritten blocks stay
    out of the step's block tables, so no decode row gathers (masked) keys that do not exist yet."""
    model, adapters = llama
    engine = make_engine(model, adapters, max_num_batched_tokens=3, kv_block_size=4)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for prompt in random_prompts([2, 3], seed=29):
        engine.add_request(prompt, params)
    engine.step()  # both prompts, 2 + ... tokens: the first whole, the second chunked
    engine.step()
    engine.add_request(random_prompts([40], seed=30)[0], params)  # reserves 10 blocks of 4
    widths = []
    forward = engine.model.forward

    def recording(input_ids, positions, ctx):
        widths.append((ctx.block_tables.shape[1], int(positions.max())))
        return forward(input_ids, positions, ctx)

    engine.model.forward = recording
    for _ in range(4):  # two decodes and one prompt token a step: every row is one token
        engine.step()
    assert all(width == -(-(top + 1) // 4) for width, top in widths), widths
