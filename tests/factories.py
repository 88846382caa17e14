"""Tiny real models and real PEFT adapters, made at test time (no hub, no network)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=256)


def make_tiny_model(out_dir: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random tiny model of `arch` (llama, mistral, qwen2) with its config to out_dir."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = cfg_cls(**{**TINY, **overrides})
    model = model_cls(config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def make_peft_adapter(model_dir: Path, out_dir: Path, r: int = 8, alpha: float = 16,
                      target_modules=("q_proj", "v_proj"), seed: int = 1, **lora_kwargs) -> Path:
    """Save a real, non-trivial PEFT LoRA adapter for the model in model_dir."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                        init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
