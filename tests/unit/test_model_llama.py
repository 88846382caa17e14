"""The Llama-family model and its loader, against HF transformers (no LoRA, no scheduler)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_plane.models.attention import AttentionContext, PrefillSeq
from data_plane.models.config import ModelArgs
from data_plane.models.loader import load_model
from data_plane.models.rope import inverse_frequencies
from tests.unit.engine_helpers import LLAMA3_ROPE, artifacts, one_thread, random_prompts  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral-tied": ("mistral", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}


def forward_logits(model_dir, tokens: list[int], dtype=torch.float32) -> torch.Tensor:
    """All-position logits of one prompt through our model (one prefill, block size 16)."""
    args = ModelArgs.from_dir(model_dir)
    model = load_model(model_dir, args, dtype, torch.device("cpu"), max_positions=256)
    s = args.spec
    cache = torch.zeros(s.num_layers, 16, 16, s.num_kv_heads, s.head_dim, dtype=dtype)
    n = len(tokens)
    ctx = AttentionContext(cache, cache.clone(), torch.arange(n), prefills=(PrefillSeq(0, n),),
                           decode_rows=torch.empty(0, dtype=torch.int64), sliding_window=args.sliding_window)
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), torch.arange(n), ctx)
        return model.compute_logits(hidden)


def hf_logits(model_dir, tokens: list[int], dtype=torch.float32) -> torch.Tensor:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode():
        return hf(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("name", list(ARCHS))
def test_prefill_logits_match_hf(artifacts, name):  # noqa: F811
    arch, overrides = ARCHS[name]
    model_dir = artifacts.model(arch, **overrides)
    tokens = random_prompts([70])[0]  # past the llama3 test original_max_position_embeddings (32)
    torch.testing.assert_close(forward_logits(model_dir, tokens), hf_logits(model_dir, tokens),
                               atol=1e-4, rtol=1e-4)


def test_mistral_sliding_window_matches_hf(artifacts):  # noqa: F811
    model_dir = artifacts.model("mistral", sliding_window=8)
    tokens = random_prompts([40])[0]
    torch.testing.assert_close(forward_logits(model_dir, tokens), hf_logits(model_dir, tokens),
                               atol=1e-4, rtol=1e-4)


def test_config_reads_arch_features(artifacts):  # noqa: F811
    qwen = ModelArgs.from_dir(artifacts.model("qwen2"))
    assert qwen.qkv_bias and not qwen.o_bias
    tied = ModelArgs.from_dir(artifacts.model("mistral", tie_word_embeddings=True))
    assert tied.tie_word_embeddings and tied.sliding_window == 4096 and tied.eos_token_ids == (2,)
    llama3 = ModelArgs.from_dir(artifacts.model("llama", rope_scaling=LLAMA3_ROPE))
    assert llama3.rope_scaling["rope_type"] == "llama3"
    plain = inverse_frequencies(ModelArgs.from_dir(artifacts.model("llama")))
    scaled = inverse_frequencies(llama3)
    assert torch.equal(scaled[0], plain[0]) and scaled[-1] < plain[-1]  # high freqs kept, low freqs scaled


def test_sharded_checkpoint_loads_identically(artifacts, tmp_path):  # noqa: F811
    source = artifacts.model("qwen2")
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    tokens = random_prompts([12])[0]
    assert torch.equal(forward_logits(tmp_path, tokens), forward_logits(source, tokens))


def test_missing_weight_and_pickle_only_are_refused(artifacts, tmp_path):  # noqa: F811
    source = artifacts.model("llama")
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="gate_up_proj"):
        load_model(tmp_path, ModelArgs.from_dir(tmp_path), torch.float32, torch.device("cpu"), 64)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path, ModelArgs.from_dir(tmp_path), torch.float32, torch.device("cpu"), 64)


def test_unsupported_rope_type_is_refused():
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
              "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}
    with pytest.raises(ValueError, match="yarn"):
        ModelArgs.from_config(config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_hf(artifacts, dtype):  # noqa: F811
    model_dir = artifacts.model("llama")
    tokens = random_prompts([20])[0]
    ours = forward_logits(model_dir, tokens, dtype)
    assert ours.dtype == torch.float32
    reference = hf_logits(model_dir, tokens, dtype)
    torch.testing.assert_close(ours, reference, atol=0.05, rtol=0.05)
    assert ours.argmax(-1).eq(reference.argmax(-1)).float().mean() > 0.9
