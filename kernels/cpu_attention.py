"""Decode attention on CPU over the paged KV cache (kernels/csrc/paged_attention_cpu.cpp): the launcher.

At decode sizes the torch path (models/attention.py: gather each sequence's blocks with
index_select, then SDPA under a mask) costs many times the arithmetic; the compiled op reads each
key and value row in place, once for the query heads that share it. It ships in the extension
kernels/cpu_kernel.py builds, under the same LORAPLANE_CPU_KERNEL switch. Reference:
kernels/reference.py:paged_decode_attention_ref.
"""

from __future__ import annotations

from types import ModuleType

import torch


def paged_decode_attention(
    module: ModuleType,                    # kernels.cpu_kernel.extension()
    q: torch.Tensor,                       # [D, H, Dh], unit-stride head_dim: one query token per sequence
    k_cache: torch.Tensor,                 # [blocks, block_size, KVH, Dh] contiguous (one layer); H % KVH == 0
    v_cache: torch.Tensor,                 # [blocks, block_size, KVH, Dh] contiguous
    block_tables: torch.Tensor,            # [D, width] int64: sequence d's position p is in block [d, p // block_size]
    positions: torch.Tensor,               # [D] int64: the query's position; keys 0..position are visible
    sliding_window: int | None = None,     # only the last `sliding_window` positions are visible
) -> torch.Tensor:                         # [D, H * Dh], q's dtype; softmax in fp32, scale 1/sqrt(Dh)
    return module.paged_decode_attention(q, k_cache, v_cache, block_tables, positions, sliding_window or 0,
                                         q.shape[-1] ** -0.5)
