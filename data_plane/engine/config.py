"""Engine configuration. Field names follow vLLM where the concept is the same."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass
class EngineConfig:
    model: str                              # Hugging Face model directory (config.json + safetensors)
    tokenizer: str | None = None            # defaults to the model directory; token-id prompts work without one
    max_loras: int = 4                      # LoRA slots, and distinct adapters in one running batch
    max_lora_rank: int = 16
    max_num_seqs: int = 64                  # running requests at once
    max_model_len: int = 2048               # prompt + generated tokens of one request
    max_num_batched_tokens: int | None = None  # tokens in one step, prompts (chunked) and decodes; default max(max_model_len, 2048)
    dtype: str = "auto"                     # auto (the checkpoint's dtype, else float32), float32, bfloat16, float16
    device: str = "cpu"
    kv_block_size: int = 16                 # tokens per KV cache block
    enable_prefix_caching: bool = True      # reuse the KV blocks of a prompt prefix already computed (same adapter)
    num_kv_blocks: int | None = None        # give this, or kv_cache_bytes, or neither (room for max_num_seqs
    kv_cache_bytes: int | None = None       #   requests of max_model_len tokens)

    def __post_init__(self) -> None:
        positive = ("max_lora_rank", "max_num_seqs", "max_model_len", "kv_block_size")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("max_loras", self.max_loras, minimum=0)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty path")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(self.max_model_len, 2048)
        # Longer prompts are fed in chunks over several steps (chunked prefill), so any budget works.
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, minimum=1)
        self.dtype = _ALIASES.get(self.dtype, self.dtype)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {self.device!r} is not a torch device: {e}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
        if self.num_kv_blocks is not None and self.kv_cache_bytes is not None:
            raise ValueError("give num_kv_blocks or kv_cache_bytes, not both")
        if self.num_kv_blocks is not None:
            _check_int("num_kv_blocks", self.num_kv_blocks, minimum=self.blocks_per_seq)
        if self.kv_cache_bytes is not None:
            _check_int("kv_cache_bytes", self.kv_cache_bytes, minimum=1)

    @property
    def blocks_per_seq(self) -> int:
        """Blocks one request of max_model_len tokens needs: the cache must hold at least that."""
        return -(-self.max_model_len // self.kv_block_size)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
