"""What the Llama-family model code needs from a Hugging Face config.json, checked once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.model_spec import ModelSpec

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArgs:
    spec: ModelSpec
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)   # rope_type plus its parameters
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str | None = None                           # the checkpoint's dtype, if recorded

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelArgs:
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        generation = model_dir / "generation_config.json"
        gen = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else {}
        return cls.from_config(config, gen, name=str(model_dir))

    @classmethod
    def from_config(cls, config: dict, generation: dict | None = None, name: str = "") -> ModelArgs:
        spec = ModelSpec.from_config(config, name=name)
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
        arch = spec.architecture
        qwen = arch == "Qwen2ForCausalLM"
        if qwen and config.get("use_sliding_window"):
            raise ValueError("Qwen2 use_sliding_window=true is not supported")
        attention_bias = bool(config.get("attention_bias", False))
        eos: list[int] = []
        for source in (config, generation or {}):
            value = source.get("eos_token_id")
            for token in value if isinstance(value, list) else [value]:
                if isinstance(token, int) and token not in eos:
                    eos.append(token)
        return cls(
            spec=spec,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(config),
            rope_scaling=_rope_scaling(config),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qwen or attention_bias,
            o_bias=attention_bias and not qwen,
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=(config.get("sliding_window") or None) if arch == "MistralForCausalLM" else None,
            eos_token_ids=tuple(eos),
            dtype=config.get("dtype") or config.get("torch_dtype"),
        )


def _rope_theta(config: dict) -> float:
    # transformers >= 5 writes rope_parameters; older configs have rope_theta at the top level.
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _rope_scaling(config: dict) -> dict:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor is not supported")
    params["rope_type"] = rope_type
    params.pop("rope_theta", None)
    params.pop("type", None)
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return params
