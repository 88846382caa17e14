"""Mixed-adapter batches through the engine against HF transformers + PEFT: greedy tokens
identical, logits close in fp32."""

from __future__ import annotations

import pytest
import torch

from data_plane.engine.request import SamplingParams
from kernels import cpu_kernel
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R
from tests.unit.engine_helpers import (  # noqa: F401 - artifacts is a fixture
    LLAMA3_ROPE,
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


def run_engine(engine, prompts, adapters, max_tokens, logits=True):
    seen = record_logits(engine) if logits else {}
    ids = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), a)
           for p, a in zip(prompts, adapters, strict=True)]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return [tokens[i] for i in ids], [torch.stack(seen[i]) for i in ids] if logits else None


def assert_matches_hf(oracle, engine, prompts, adapters, max_tokens=8):
    ours, our_logits = run_engine(engine, prompts, adapters, max_tokens)
    expected = oracle.generate(prompts, adapters, max_tokens)
    for i, (tokens, logits) in enumerate(expected):
        assert ours[i] == tokens, f"request {i} (adapter {adapters[i]}) differs"
        torch.testing.assert_close(our_logits[i], logits, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def llama_adapters(artifacts):  # noqa: F811
    model = artifacts.model("llama")
    return model, {
        "r1": artifacts.adapter(model, r=1, alpha=1, target_modules=("q_proj", "v_proj"), seed=1),
        "r8": artifacts.adapter(model, r=8, alpha=16, target_modules=("k_proj", "o_proj", "up_proj"), seed=2),
        "r64": artifacts.adapter(model, r=64, alpha=32, target_modules=ALL, seed=3),
        "rslora": artifacts.adapter(model, r=16, alpha=8, target_modules=("o_proj", "down_proj"), seed=4,
                                    use_rslora=True),
        "layer1": artifacts.adapter(model, r=4, alpha=12, target_modules=("gate_proj", "up_proj", "q_proj"),
                                    seed=5, layers_to_transform=[1]),
    }


@pytest.mark.parametrize("kernel_mode", ["on", "off"])  # the compiled CPU kernels, and the torch ops
def test_mixed_ranks_modules_and_base_requests_match_hf(llama_adapters, kernel_mode, monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, kernel_mode)
    model, adapters = llama_adapters
    engine = make_engine(model, adapters)
    names = ["r1", None, "r8", "r64", "rslora", None, "layer1", "r64", "r1"]
    prompts = random_prompts([5, 17, 9, 30, 3, 12, 21, 8, 14], seed=1)
    assert_matches_hf(HFOracle(model, adapters), engine, prompts, names)
    assert engine.blocks.num_used == 0


def test_hf_mixed_batch_oracle_agrees(llama_adapters):
    """The oracle itself in one mixed batch (PEFT adapter_names), not request by request."""
    model, adapters = llama_adapters
    names = ["r64", None, "rslora", "layer1", "r8", "r1"]
    prompts = random_prompts([10] * len(names), seed=2)
    expected = HFOracle(model, adapters).generate_batch(prompts, names, 6)
    ours, _ = run_engine(make_engine(model, adapters), prompts, names, 6, logits=False)
    assert ours == expected


@pytest.mark.parametrize("kernel_mode", ["on", "off"])  # decode rows among prefill rows, both attention paths
def test_requests_arriving_mid_decode_match_hf(llama_adapters, kernel_mode, monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, kernel_mode)
    model, adapters = llama_adapters
    engine = make_engine(model, adapters)
    first = random_prompts([6, 11], seed=3)
    late = random_prompts([19, 4, 9], seed=4)
    first_names, late_names = ["r8", None], ["r64", "rslora", None]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    seen = record_logits(engine)
    batches = []
    run = engine.runner.run
    engine.runner.run = lambda batch: batches.append(batch) or run(batch)
    ids = [engine.add_request(p, params, a) for p, a in zip(first, first_names, strict=True)]
    tokens: dict[str, list[int]] = {}
    for _ in range(4):
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    assert all(len(tokens[i]) == 4 for i in ids)  # decoding when the others arrive
    ids += [engine.add_request(p, params, a) for p, a in zip(late, late_names, strict=True)]
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    # The late prompts joined the running decodes in one batch: nobody waited a step for them.
    assert batches[4].num_prefills == 3 and len(batches[4].requests) == 5
    assert len(batches) == 4 + 10
    expected = HFOracle(model, adapters).generate(first + late, first_names + late_names, 10)
    assert [tokens[i] for i in ids] == [t for t, _ in expected]
    for i, (_, logits) in zip(ids, expected, strict=True):
        torch.testing.assert_close(torch.stack(seen[i]), logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {"rope_scaling": LLAMA3_ROPE}),
    ("mistral", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
])
def test_architectures_with_adapters_match_hf(artifacts, arch, overrides):  # noqa: F811
    model = artifacts.model(arch, **overrides)
    adapters = {
        "all": artifacts.adapter(model, r=8, alpha=16, target_modules=ALL, seed=7),
        "qv": artifacts.adapter(model, r=2, alpha=5, target_modules=("q_proj", "v_proj"), seed=8),
    }
    engine = make_engine(model, adapters)
    prompts = random_prompts([40, 7, 23], seed=5)  # 40 + 8 tokens: past llama3's original 32 positions
    assert_matches_hf(HFOracle(model, adapters), engine, prompts, ["all", None, "qv"])


def test_slot_reuse_leaves_no_residue(llama_adapters):
    """A rank-1 adapter loaded over a rank-64 one behaves exactly as in a fresh slot."""
    model, adapters = llama_adapters
    prompts = random_prompts([9, 9], seed=6)
    fresh = make_engine(model, {"r1": adapters["r1"]})
    expected, _ = run_engine(fresh, prompts, ["r1", None], 6, logits=False)
    reused = make_engine(model, {"r64": adapters["r64"]})
    run_engine(reused, prompts, ["r64", None], 2, logits=False)
    reused.load_adapter("r1", 0, normalized(model, adapters["r1"]))
    assert reused.adapter_slots == {"r1": 0}
    ours, _ = run_engine(reused, prompts, ["r1", None], 6, logits=False)
    assert ours == expected


def test_evicted_slot_is_zero_and_adapter_changes_output(llama_adapters):
    model, adapters = llama_adapters
    engine = make_engine(model, {"r64": adapters["r64"]})
    prompt = random_prompts([12], seed=7)
    with_lora, _ = run_engine(engine, prompt, ["r64"], 6, logits=False)
    base, _ = run_engine(engine, prompt, [None], 6, logits=False)
    assert with_lora != base
    assert engine.evict_adapter("r64") == 0
    assert engine.loras.slot_ranks == [0]
    assert all(not t[0].any() for lin in engine.loras.linears for t in lin.lora_a + lin.lora_b)


def test_incompatible_or_too_large_adapter_leaves_slot_unchanged(artifacts, llama_adapters):  # noqa: F811
    model, adapters = llama_adapters
    other = artifacts.model("llama", hidden_size=32, intermediate_size=64)
    foreign = normalized(other, artifacts.adapter(other, r=4, target_modules=("q_proj",)))
    engine = make_engine(model, {"r8": adapters["r8"]}, max_lora_rank=8)
    before = [t.clone() for lin in engine.loras.linears for t in lin.lora_a]
    with pytest.raises(LoraplaneError) as err:
        engine.load_adapter("foreign", 0, foreign)
    assert err.value.reason == R.ERROR_REASON_ADAPTER_INCOMPATIBLE
    with pytest.raises(LoraplaneError) as err:
        engine.load_adapter("big", 0, normalized(model, adapters["r64"]))
    assert err.value.reason == R.ERROR_REASON_RANK_TOO_LARGE
    after = [t for lin in engine.loras.linears for t in lin.lora_a]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert engine.adapter_slots == {"r8": 0} and engine.loras.slot_ranks == [8]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engine_tracks_fp32(llama_adapters, dtype):
    """Half-precision weights, KV cache and LoRA slots: same first greedy tokens, logits close."""
    model, adapters = llama_adapters
    subset = {"r64": adapters["r64"], "rslora": adapters["rslora"]}
    prompts, names = random_prompts([13, 6, 20], seed=9), ["r64", None, "rslora"]
    reference, ref_logits = run_engine(make_engine(model, subset), prompts, names, 4)
    half = make_engine(model, subset, dtype=dtype)
    assert half.kv.k.dtype == half.loras.linears[0].lora_a[0].dtype == getattr(torch, dtype)
    tokens, logits = run_engine(half, prompts, names, 4)
    for ours, ref, lg, ref_lg in zip(tokens, reference, logits, ref_logits, strict=True):
        assert ours[0] == ref[0]
        torch.testing.assert_close(lg[0], ref_lg[0], atol=0.1, rtol=0.05)
