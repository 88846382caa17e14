"""Plain-torch multi-LoRA shrink/expand: the CPU path and the reference the Triton kernels are tested against."""

from __future__ import annotations

import torch

from kernels.metadata import LoraBatchMeta


def shrink_ref(
    x: torch.Tensor,                       # [T, in]
    a_stacks: tuple[torch.Tensor, ...],    # per slice: [S, R, in]
    meta: LoraBatchMeta,
) -> torch.Tensor:                         # [n_slices, T, R] float32 (rows of base-only tokens are 0)
    n, T, R = len(a_stacks), x.shape[0], a_stacks[0].shape[1]
    out = torch.zeros(n, T, R, dtype=torch.float32, device=x.device)
    for slot, start, count, rank in zip(meta.active_slots_list, meta.slot_starts_list,
                                        meta.slot_counts_list, meta.slot_ranks_list, strict=True):
        ids = meta.sorted_token_ids[start:start + count]
        xs = x[ids].float()
        for i, a in enumerate(a_stacks):
            out[i, ids, :rank] = xs @ a[slot, :rank].float().t()
    return out


def expand_ref(
    y: torch.Tensor,                       # [T, sum(out_i)], updated in place
    v: torch.Tensor,                       # [n_slices, T, R] float32, from shrink
    b_stacks: tuple[torch.Tensor, ...],    # per slice: [S, out_i, R]
    meta: LoraBatchMeta,
    scale: torch.Tensor | None = None,     # [S] float32 per-slot scale, None = 1 (scaling pre-folded)
) -> None:
    for slot, start, count, rank in zip(meta.active_slots_list, meta.slot_starts_list,
                                        meta.slot_counts_list, meta.slot_ranks_list, strict=True):
        ids = meta.sorted_token_ids[start:start + count]
        offset = 0
        for i, b in enumerate(b_stacks):
            width = b.shape[1]
            delta = v[i, ids, :rank] @ b[slot, :, :rank].float().t()
            if scale is not None:
                delta = delta * scale[slot]
            y[ids, offset:offset + width] += delta.to(y.dtype)
            offset += width


def paged_decode_attention_ref(
    q: torch.Tensor,                       # [D, H, Dh]
    k_cache: torch.Tensor,                 # [blocks, block_size, KVH, Dh]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,            # [D, width] int64
    positions: torch.Tensor,               # [D] int64
    sliding_window: int | None = None,
) -> torch.Tensor:                         # [D, H * Dh] in q's dtype, computed in fp32
    """One sequence at a time: gather its visible keys and values, expand them to the query heads."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    heads, head_dim = q.shape[1], q.shape[2]
    out = torch.empty(q.shape[0], heads * head_dim, dtype=q.dtype)
    for d, pos in enumerate(positions.tolist()):
        first = max(0, pos - sliding_window + 1) if sliding_window else 0
        p = torch.arange(first, pos + 1)
        blocks = block_tables[d, p // block_size]
        keys = k_cache[blocks, p % block_size].float().repeat_interleave(heads // kv_heads, dim=1)  # [L, H, Dh]
        values = v_cache[blocks, p % block_size].float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[d].float(), keys) * head_dim ** -0.5
        out[d] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values).reshape(-1).to(q.dtype)
    return out
