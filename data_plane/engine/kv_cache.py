"""The KV cache tensors: one allocation at start, sized from a block count or a byte budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_plane.engine.config import EngineConfig
from loraplane.model_spec import ModelSpec


def block_bytes(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for block_size tokens."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize


def num_blocks(config: EngineConfig, spec: ModelSpec, dtype: torch.dtype) -> int:
    """Blocks that fit the configured budget; ValueError if one max_model_len request would not fit."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_bytes is None:
        return config.max_num_seqs * config.blocks_per_seq
    per_block = block_bytes(spec, config.kv_block_size, dtype)
    blocks = config.kv_cache_bytes // per_block
    if blocks < config.blocks_per_seq:
        raise ValueError(
            f"kv_cache_bytes={config.kv_cache_bytes} holds {blocks} blocks of {per_block} bytes; one request "
            f"of max_model_len={config.max_model_len} needs {config.blocks_per_seq}")
    return blocks


@dataclass
class KVCache:
    k: torch.Tensor     # [layers, num_blocks, block_size, kv_heads, head_dim]
    v: torch.Tensor

    @classmethod
    def allocate(cls, spec: ModelSpec, blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> KVCache:
        shape = (spec.num_layers, blocks, block_size, spec.num_kv_heads, spec.head_dim)
        # Zeroed, not empty: gathered padding positions are masked, but NaN garbage times a zero
        # attention weight would still poison the output.
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
