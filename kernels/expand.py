"""Multi-LoRA expand (SGMV): y[t, col_i : col_i + out_i] += scale[slot] * v[i, t, :rank] @ B_i[slot, :, :rank]^T.

Updates the base layer's output in place, so the LoRA delta costs one read and one write of y and no
extra buffer. One launch covers every slice, and slices may differ in width (q is wider than k and
v under GQA): the grid is sized for the widest and programs past a narrower slice's end exit.

Tiles are grouped by slot: a program owns BLOCK_M tokens of one slot, so a B tile is read once per
group of tokens rather than once per token (the BGMV cost), which is what keeps prefill cheap. In
decode, where B and y dominate the bytes, a 16-row tile holds all of a slot's few tokens.

The torch reference these kernels are tested against is kernels.reference.expand_ref; it stays
there because it is also the CPU path, which must import without Triton.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.reference import expand_ref  # noqa: F401 - the reference, re-exported next to its kernel
from kernels.triton_utils import (
    block_m_for,
    check_devices,
    check_stacks,
    dot_in_fp32,
    dot_precision,
    for_device,
    int64_table,
)


@triton.jit
def _expand_kernel(
    y_ptr, v_ptr, b_ptr, b_table_ptr, scale_ptr,
    token_ids_ptr, slots_ptr, starts_ptr, counts_ptr, ranks_ptr,
    R, N0, n_tiles,
    stride_yt, stride_yn,
    stride_vi, stride_vt, stride_vr,
    stride_bs, stride_bn, stride_br,
    NUM_SLICES: tl.constexpr, TABLE_STRIDES: tl.constexpr,
    ALIGNED: tl.constexpr, B_VEC: tl.constexpr, HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_slice = tl.program_id(1)
    pid_slot = tl.program_id(2)
    # N fastest: neighbouring programs reuse one v tile and token set from L2.
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles

    count = tl.load(counts_ptr + pid_slot)
    if pid_m * BLOCK_M >= count:
        return
    if NUM_SLICES == 1:
        b_base = b_ptr
        width = N0
        col0 = 0
        stride_slot = stride_bs
    else:
        # Table row: (address, width, first column in y, slot, column and rank strides) of this
        # slice's B stack.
        row = b_table_ptr + pid_slice * 6
        b_base = tl.load(row).to(tl.pointer_type(b_ptr.dtype.element_ty))
        width = tl.load(row + 1)
        col0 = tl.load(row + 2)
        stride_slot = tl.load(row + 3)
        if TABLE_STRIDES:
            # Slices laid out [S, R, out] (the CPU layout) have a rank stride of their own width.
            # Only then: strides passed as arguments let the compiler see a unit stride.
            stride_bn = tl.load(row + 4)
            stride_br = tl.load(row + 5)
        if ALIGNED:  # values read from memory have no known alignment: without this, 2-byte accesses
            b_base = tl.multiple_of(b_base, 16)
            width = tl.multiple_of(width, 8)
            col0 = tl.multiple_of(col0, 8)
            stride_slot = tl.multiple_of(stride_slot, 8)
    if pid_n * BLOCK_N >= width:
        return
    slot = tl.load(slots_ptr + pid_slot).to(tl.int64)
    start = tl.load(starts_ptr + pid_slot)
    rank = tl.minimum(tl.load(ranks_ptr + pid_slot), R)
    b_base += slot * stride_slot

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tok = tl.load(token_ids_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width

    if B_VEC:
        # B rows run along the rank: a mask at a multiple of 8 keeps them 16-byte loads. The up to
        # 7 padding columns it reads are zero in the engine; finite is enough, v is 0 there.
        b_rank = tl.multiple_of((rank + 7) // 8 * 8, 8)
    else:
        b_rank = rank

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see triton_utils.for_device
    # The loop stops at the slot's real rank: the padding up to R costs nothing.
    for k in range(0, rank, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        vt = tl.load(v_ptr + pid_slice * stride_vi + tok[:, None] * stride_vt + offs_k[None, :] * stride_vr,
                     mask=m_mask[:, None] & (offs_k < rank)[None, :], other=0.0)
        bt = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_br,
                     mask=n_mask[None, :] & (offs_k < b_rank)[:, None], other=0.0)
        if DOT_F32:
            acc += tl.dot(vt, bt.to(tl.float32), input_precision=PRECISION)
        else:
            # v is fp32; rounding it to B's dtype puts the dot on tensor cores, and y is stored
            # at that precision or lower anyway.
            acc += tl.dot(vt.to(bt.dtype), bt, input_precision=PRECISION)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + slot)

    y_ptrs = y_ptr + tok[:, None] * stride_yt + (col0 + offs_n)[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def expand(
    y: torch.Tensor,                     # [T, sum(out_i)] base layer output, updated in place
    v: torch.Tensor,                     # [n_slices, T, R] fp32, from shrink
    b_stacks: Sequence[torch.Tensor],    # per slice: [S, out_i, R], one dtype, any strides;
                                         # finite past each slot's rank (see B_VEC in the kernel)
    token_ids: torch.Tensor,             # [T_lora] int64, LoRA tokens grouped by slot
    slots: torch.Tensor,                 # [A] int32, active slot ids
    starts: torch.Tensor,                # [A] int32, each slot's first index into token_ids
    counts: torch.Tensor,                # [A] int32, tokens per active slot
    ranks: torch.Tensor,                 # [A] int32, real rank per active slot (<= R)
    max_count: int,                      # max(counts), host side: sizes the grid without a sync
    scale: torch.Tensor | None = None,   # [S] fp32 per-slot scale; None = 1 (folded into B)
    *,
    block_m: int | None = None,          # block overrides are for tests and tuning
    block_n: int | None = None,
    block_k: int | None = None,
) -> None:
    check_stacks(b_stacks, "expand", same_shape=False)
    n_slices, R = len(b_stacks), b_stacks[0].shape[2]
    widths = [b.shape[1] for b in b_stacks]
    if v.shape[0] != n_slices or v.shape[1] != y.shape[0] or v.shape[2] != R or y.shape[1] != sum(widths):
        raise ValueError(f"expand: y {tuple(y.shape)}, v {tuple(v.shape)} and B widths {widths} "
                         f"with rank {R} do not fit together")
    if v.dtype != torch.float32:
        raise ValueError(f"expand: v must be float32 (shrink's output), got {v.dtype}")
    check_devices("expand", y, v, *b_stacks, token_ids, slots, starts, counts, ranks,
                  *(() if scale is None else (scale,)))
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (b_stacks[0].shape[0],)):
        raise ValueError(f"expand: scale must be float32 [{b_stacks[0].shape[0]}] (one per slot), "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    n_active = slots.shape[0]
    if n_active == 0 or max_count == 0 or y.shape[0] == 0:
        return

    block_m = block_m or block_m_for(max_count)
    block_n = block_n or min(128, max(16, triton.next_power_of_2(max(widths))))
    block_k = block_k or min(64, max(16, triton.next_power_of_2(R)))
    m_tiles, n_tiles = triton.cdiv(max_count, block_m), triton.cdiv(max(widths), block_n)

    b0 = b_stacks[0]
    cols = [sum(widths[:i]) for i in range(n_slices)]
    aligned = (all(b.data_ptr() % 16 == 0 and b.stride(0) % 8 == 0 for b in b_stacks)
               and all(n % 8 == 0 for n in widths + cols))
    if n_slices > 1:
        b_table = int64_table([(b.data_ptr(), w, c, b.stride(0), b.stride(1), b.stride(2))
                               for b, w, c in zip(b_stacks, widths, cols, strict=True)], y.device)
    else:
        b_table = b0
    # fp16 B: v rounded to fp16 overflows past 65504 where the fp32 result is finite (the scale
    # folded into B shrinks it), so the dot takes fp32 operands, on tf32 tensor cores on CUDA.
    dot_f32 = dot_in_fp32(y.device, b0.dtype) or b0.dtype == torch.float16
    if b0.dtype == torch.float32 or y.device.type == "cpu" or (dot_f32 and not _has_tf32(y.device)):
        precision = "ieee"  # fp16 before Ampere (V100, T4) has no tf32 tensor cores
    else:
        precision = "tf32" if dot_f32 else dot_precision(b0.dtype)
    table_strides = any(b.stride()[1:] != b0.stride()[1:] for b in b_stacks)
    b_vec = R % 8 == 0 and all(b.stride(2) == 1 and b.stride(1) % 8 == 0 for b in b_stacks)
    kernel = for_device(_expand_kernel, y.device)
    kernel[(m_tiles * n_tiles, n_slices, n_active)](
        y, v, b0, b_table, scale if scale is not None else b0,
        token_ids, slots, starts, counts, ranks,
        R, widths[0], n_tiles,
        y.stride(0), y.stride(1),
        v.stride(0), v.stride(1), v.stride(2),
        b0.stride(0), b0.stride(1), b0.stride(2),
        NUM_SLICES=n_slices, TABLE_STRIDES=table_strides, ALIGNED=aligned, HAS_SCALE=scale is not None,
        B_VEC=b_vec,
        PRECISION=precision, DOT_F32=dot_f32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4,
    )


def _has_tf32(device: torch.device) -> bool:
    return device.type == "cuda" and _cuda_major(device.index if device.index is not None
                                                 else torch.cuda.current_device()) >= 8


@functools.cache
def _cuda_major(index: int) -> int:  # once per device, not per launch
    return torch.cuda.get_device_capability(index)[0]
