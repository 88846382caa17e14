"""Prefix caching: a prompt that starts like an earlier one on the same adapter reuses its KV blocks,
and the tokens stay identical to HF transformers + PEFT."""

from __future__ import annotations

import pytest
import torch

from data_plane.engine.request import SamplingParams
from tests.unit.engine_helpers import (  # noqa: F401 - fixtures
    HFOracle,
    artifacts,
    make_engine,
    normalized,
    one_thread,
    random_prompts,
    record_logits,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARAMS = SamplingParams(max_tokens=5, ignore_eos=True)
BLOCK = 8


@pytest.fixture(scope="module")
def llama(artifacts):  # noqa: F811
    model = artifacts.model("llama")
    adapters = {
        "x": artifacts.adapter(model, r=8, alpha=16, target_modules=ALL, seed=31),
        "y": artifacts.adapter(model, r=4, alpha=8, target_modules=ALL, seed=32),
    }
    return model, adapters, HFOracle(model, adapters)


def run(engine, prompts, adapters) -> tuple[list[list[int]], list[int]]:
    """Tokens per request, and the tokens each found cached at its first admission."""
    cached: dict[str, int] = {}
    allocate = engine.blocks.allocate

    def recording(request, salt=b""):
        allocate(request, salt)
        cached.setdefault(request.request_id, request.num_computed_tokens)

    engine.blocks.allocate = recording
    ids = [engine.add_request(p, PARAMS, a) for p, a in zip(prompts, adapters, strict=True)]
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    engine.blocks.allocate = allocate
    return [tokens[i] for i in ids], [cached[i] for i in ids]


def shared_prefix_prompts(seed: int) -> tuple[list[int], list[int], list[int]]:
    system, a, b = random_prompts([3 * BLOCK + 2, 5, 9], seed=seed)
    return system, system + a, system + b


def test_a_shared_prefix_is_reused_and_tokens_match_hf(llama):
    model, adapters, oracle = llama
    engine = make_engine(model, adapters, kv_block_size=BLOCK)
    _, first, second = shared_prefix_prompts(seed=33)
    seen = record_logits(engine)
    (tokens_1,), (cached_1,) = run(engine, [first], ["x"])
    (tokens_2,), (cached_2,) = run(engine, [second], ["x"])
    assert cached_1 == 0 and cached_2 == 3 * BLOCK  # the three full blocks of the shared prefix
    assert engine.blocks.prefix_hits == 3 * BLOCK
    expected = oracle.generate([first, second], ["x", "x"], 5)
    assert [tokens_1, tokens_2] == [t for t, _ in expected]
    for request_id, (_, logits) in zip(sorted(seen, key=list(seen).index), expected, strict=True):
        torch.testing.assert_close(torch.stack(seen[request_id]), logits, atol=2e-4, rtol=1e-4)
    assert engine.blocks.num_used == 0  # cached blocks are free: kept only until someone needs them


def test_the_same_prompt_again_recomputes_only_its_last_block(llama):
    model, adapters, oracle = llama
    engine = make_engine(model, adapters, kv_block_size=BLOCK)
    prompt = random_prompts([4 * BLOCK], seed=34)[0]  # exactly 4 blocks: the last token must be computed
    (first,), (cached_1,) = run(engine, [prompt], [None])
    (again,), (cached_2,) = run(engine, [prompt], [None])
    assert (cached_1, cached_2) == (0, 3 * BLOCK)
    assert first == again == oracle.generate([prompt], [None], 5)[0][0]


def test_prefixes_are_not_shared_across_adapters_or_the_base_model(llama):
    model, adapters, oracle = llama
    engine = make_engine(model, adapters, kv_block_size=BLOCK)
    _, first, second = shared_prefix_prompts(seed=35)
    tokens, cached = run(engine, [first], ["x"])
    more, cached_more = run(engine, [second, second], ["y", None])
    assert cached_more == [0, 0]
    assert tokens + more == [t for t, _ in oracle.generate([first, second, second], ["x", "y", None], 5)]


def test_a_reloaded_adapter_does_not_reuse_the_old_weights_kv(llama, artifacts):  # noqa: F811
    model, adapters, oracle = llama
    engine = make_engine(model, adapters, kv_block_size=BLOCK)
    _, first, second = shared_prefix_prompts(seed=36)
    run(engine, [first], ["x"])
    engine.load_adapter("x", 0, normalized(model, adapters["y"]))  # the name "x", other weights
    tokens, cached = run(engine, [second], ["x"])
    assert cached == [0]
    assert tokens == [oracle.generate([second], ["y"], 5)[0][0]]


def test_requests_running_together_share_blocks(llama):
    model, adapters, oracle = llama
    engine = make_engine(model, adapters, kv_block_size=BLOCK)
    system, first, second = shared_prefix_prompts(seed=37)
    engine.add_request(system + [1], SamplingParams(max_tokens=30, ignore_eos=True), "x")
    engine.step()  # the system prompt's blocks are now computed, and held by a running request
    tokens, cached = run(engine, [first, second], ["x", "x"])
    assert cached == [3 * BLOCK, 3 * BLOCK]
    assert tokens == [t for t, _ in oracle.generate([first, second], ["x", "x"], 5)]


def test_disabled_caching_recomputes_everything(llama):
    model, adapters, oracle = llama
    engine = make_engine(model, adapters, kv_block_size=BLOCK, enable_prefix_caching=False)
    _, first, second = shared_prefix_prompts(seed=38)
    tokens, cached = run(engine, [first, second, second], ["x", "x", "x"])
    assert cached == [0, 0, 0] and engine.blocks.num_cached == 0
    assert tokens == [t for t, _ in oracle.generate([first, second, second], ["x", "x", "x"], 5)]


def test_cached_blocks_are_evicted_when_memory_is_needed(llama):
    model, adapters, _ = llama
    # 8 blocks of 8 tokens: every prompt below needs 5-6 of them, so each admission evicts cached ones.
    tight = make_engine(model, adapters, kv_block_size=BLOCK, num_kv_blocks=8, max_model_len=64)
    roomy = make_engine(model, adapters, kv_block_size=BLOCK, enable_prefix_caching=False)
    prompts = random_prompts([30, 35, 40, 33], seed=39)
    prompts += [prompts[0][:20] + [7, 8, 9]]  # a prefix of the first: cached, unless evicted
    names = ["x", None, "y", "x", "x"]
    got, _ = run(tight, prompts, names)
    expected, _ = run(roomy, prompts, names)
    assert got == expected
    assert tight.blocks.num_used == 0 and tight.blocks.peak_used <= 8
    assert tight.blocks.num_cached <= 8


def test_an_adapter_loaded_again_with_the_same_cache_salt_keeps_its_prefixes(llama):
    """The data plane's promotions: the same weights under a content-addressed key, evicted and back."""
    model, adapters, oracle = llama
    engine = make_engine(model, kv_block_size=BLOCK, max_loras=1)  # one slot: loading y evicts x
    _, first, second = shared_prefix_prompts(seed=40)
    weights = normalized(model, adapters["x"])
    engine.load_adapter("x", 0, weights, cache_salt=b"x@sha256:1")
    run(engine, [first], ["x"])
    engine.load_adapter("y", 0, normalized(model, adapters["y"]), cache_salt=b"y@sha256:2")  # evicts x
    engine.load_adapter("x", 0, weights, cache_salt=b"x@sha256:1")
    tokens, cached = run(engine, [second], ["x"])
    assert cached == [3 * BLOCK]
    assert tokens == [oracle.generate([second], ["x"], 5)[0][0]]


def test_the_hit_counters_count_first_admissions_only(llama):
    model, adapters, _ = llama
    engine = make_engine(model, adapters, kv_block_size=BLOCK, num_kv_blocks=9, max_model_len=64,
                         max_num_batched_tokens=6)
    prompts = random_prompts([20, 9, 31, 14, 26], seed=41)
    for prompt, name in zip(prompts, ["x", None, "y", "x", None], strict=True):
        engine.add_request(prompt, SamplingParams(max_tokens=20, ignore_eos=True), name)
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.num_preemptions > 0  # re-admissions happened, and are not counted
    assert engine.blocks.prefix_queries == sum(len(p) for p in prompts)


def test_a_duplicate_block_takes_over_the_digest_when_the_registered_copy_is_evicted():
    from data_plane.engine.block_manager import BlockManager
    from data_plane.engine.request import Request

    blocks = BlockManager(num_blocks=6, block_size=2)
    prompt = [1, 2, 3, 4, 5]  # two full blocks before the last token

    def admitted(tokens: list[int], name: str) -> Request:
        request = Request(name, list(tokens), PARAMS, None)
        blocks.allocate(request)
        return request

    a, b = admitted(prompt, "a"), admitted(prompt, "b")  # in one step: neither finds the other's blocks
    for request in (a, b):
        request.num_computed_tokens = 5
        blocks.commit(request)  # a's blocks are registered; b's are duplicates
    blocks.free(a)
    admitted([9, 9, 9, 9, 9, 9], "c")  # takes every free block, evicting a's cached ones
    b_blocks = b.block_table[:2]
    blocks.free(b)
    d = admitted(prompt, "d")
    assert d.num_computed_tokens == 4 and d.block_table[:2] == b_blocks
