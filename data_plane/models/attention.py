"""Attention over a paged KV cache, with torch SDPA.

The cache of one layer is [num_blocks, block_size, kv_heads, head_dim]; a token's K/V lives at
flat slot `block * block_size + offset`. A batch mixes prefill sequences and decode tokens.
A prompt's first chunk attends causally within its fresh tokens; a later chunk of a prompt
(chunked prefill) gathers the sequence's blocks, its earlier chunks' K/V included. A decode token
gathers its sequence's blocks and masks past its position; on CPU the compiled op
(kernels/cpu_attention.py) reads them in place instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from kernels.cpu_attention import paged_decode_attention


@dataclass(frozen=True)
class PrefillSeq:
    start: int                            # rows [start, end) of the batch
    end: int
    cached: int = 0                       # tokens of the sequence already in the cache (earlier chunks)
    blocks: torch.Tensor | None = None    # with cached > 0: [ceil((cached + end - start) / block_size)] int64


@dataclass
class AttentionContext:
    k_cache: torch.Tensor                    # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor               # [T] int64, cache slot written by each token
    prefills: tuple[PrefillSeq, ...] = ()    # the sequences feeding more than one token
    block_tables: torch.Tensor | None = None  # decode: [D, max_blocks] int64, one row per decode token
    decode_mask: torch.Tensor | None = None  # decode: [D, 1, 1, max_blocks * block_size], 0 or -inf
    decode_positions: torch.Tensor | None = None  # decode: [D] int64, each query's position
    # The compiled CPU ops (kernels.cpu_kernel.extension()): decode reads the cache in place, no mask.
    cpu_kernel: ModuleType | None = None
    # Rows of the D decode tokens among the prefill rows; None when the batch is decode tokens only.
    decode_rows: torch.Tensor | None = None
    sliding_window: int | None = None


def paged_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    ctx: AttentionContext) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] for the batch's new tokens -> [T, H * D]."""
    k_cache, v_cache = ctx.k_cache[layer], ctx.v_cache[layer]
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, ctx.slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, ctx.slot_mapping, v)
    if ctx.decode_rows is None:
        return _decode(q, k_cache, v_cache, ctx)
    out = _prefill(q, k, v, k_cache, v_cache, ctx)
    if ctx.block_tables is not None:
        out.index_copy_(0, ctx.decode_rows, _decode(q.index_select(0, ctx.decode_rows), k_cache, v_cache, ctx))
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q [D, H, D_h], one query token per sequence -> [D, H * D_h]."""
    if ctx.cpu_kernel is not None:
        return paged_decode_attention(ctx.cpu_kernel, q, k_cache, v_cache, ctx.block_tables, ctx.decode_positions,
                                      ctx.sliding_window)
    batch, heads, _ = q.shape
    kv_heads, head_dim = k_cache.shape[-2:]
    flat_blocks = ctx.block_tables.flatten()
    # [B * blocks, block_size, KVH, D] -> [B, KVH, L, D]; index_select beats advanced indexing here.
    keys = k_cache.index_select(0, flat_blocks).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, flat_blocks).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    # One query token per sequence: the query heads sharing a KV head go in as that head's
    # "query positions", so SDPA needs no GQA expansion of the gathered keys and values.
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=ctx.decode_mask)
    return out.reshape(batch, -1)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             ctx: AttentionContext) -> torch.Tensor:
    """Each prefill sequence's rows attend causally to its tokens so far; other rows are left unset."""
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    window = ctx.sliding_window
    for seq in ctx.prefills:
        n = seq.end - seq.start
        qs = q[seq.start:seq.end].transpose(0, 1).unsqueeze(0)
        if seq.cached:  # a later chunk: this chunk's K/V are already written after the earlier ones'
            length = seq.cached + n
            ks, vs = (c.index_select(0, seq.blocks).flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
                      for c in (k_cache, v_cache))
            mask = _visible(n, length, seq.cached, window, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
        else:
            ks, vs = (t[seq.start:seq.end].transpose(0, 1).unsqueeze(0) for t in (k, v))
            if window is not None and n > window:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_visible(n, n, 0, window, q.device),
                                                   enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        out[seq.start:seq.end] = o[0].transpose(0, 1).reshape(n, -1)
    return out


def _visible(queries: int, keys: int, first: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[queries, keys] bool: the query at position first + i sees key j when j <= first + i (and in the window)."""
    distance = (first + torch.arange(queries, device=device))[:, None] - torch.arange(keys, device=device)[None, :]
    visible = distance >= 0
    return visible & (distance < window) if window is not None else visible
