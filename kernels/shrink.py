"""Multi-LoRA shrink (SGMV): v[i, t, :rank] = x[t] @ A_i[slot(t), :rank]^T, accumulated in fp32.

One launch covers every slice (q/k/v or gate/up) and every active slot. Tokens come grouped by slot
(LoraBatchMeta.sorted_token_ids), so a program multiplies a tile of one slot's tokens by that slot's
A: each A tile is read once per tile of tokens, not once per token.

Decode gives each slot a few tokens and N is the rank (8-64): M x N tiles alone leave most SMs idle
while A, the bulk of the bytes, streams from HBM. The hidden dimension K is then split across
programs (split-K) whose fp32 partial sums meet in v through atomics.

The torch reference these kernels are tested against is kernels.reference.shrink_ref; it stays
there because it is also the CPU path, which must import without Triton.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.reference import shrink_ref  # noqa: F401 - the reference, re-exported next to its kernel
from kernels.triton_utils import (
    block_m_for,
    check_devices,
    check_stacks,
    dot_in_fp32,
    dot_precision,
    for_device,
    int64_table,
    target_programs,
)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, a_table_ptr, v_ptr,
    token_ids_ptr, slots_ptr, starts_ptr, counts_ptr, ranks_ptr,
    K, R, k_per_split, n_tiles, split_k,
    stride_xt, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_vi, stride_vt, stride_vr,
    NUM_SLICES: tl.constexpr, ALIGNED: tl.constexpr, ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_slice = tl.program_id(1)
    pid_slot = tl.program_id(2)
    # (split, m tile, rank tile) share axis 0: axes 1 and 2 are the slice and the slot.
    pid_k = pid % split_k
    pid_mn = pid // split_k
    pid_m = pid_mn // n_tiles
    pid_n = pid_mn % n_tiles

    # The grid is sized by the largest slot; programs past a smaller slot's tokens or past its real
    # rank exit before touching memory, which is what makes padding ranks to R free.
    count = tl.load(counts_ptr + pid_slot)
    if pid_m * BLOCK_M >= count:
        return
    rank = tl.minimum(tl.load(ranks_ptr + pid_slot), R)
    if pid_n * BLOCK_N >= rank:
        return
    slot = tl.load(slots_ptr + pid_slot).to(tl.int64)
    start = tl.load(starts_ptr + pid_slot)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < count
    tok = tl.load(token_ids_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < rank

    if NUM_SLICES == 1:
        a_base = a_ptr
    else:
        a_base = tl.load(a_table_ptr + pid_slice).to(tl.pointer_type(a_ptr.dtype.element_ty))
        if ALIGNED:  # an address read from memory has no known alignment: without this, 2-byte loads
            a_base = tl.multiple_of(a_base, 16)
    a_base += slot * stride_as

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see triton_utils.for_device
    for k in range(k_start, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        xt = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + offs_n[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                     mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        if DOT_F32:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt.to(at.dtype), at, input_precision=PRECISION)

    v_ptrs = v_ptr + pid_slice * stride_vi + tok[:, None] * stride_vt + offs_n[None, :] * stride_vr
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(v_ptrs, acc, mask=mask)
    else:
        tl.store(v_ptrs, acc, mask=mask)


def shrink(
    x: torch.Tensor,                     # [T, K] layer input
    a_stacks: Sequence[torch.Tensor],    # per slice: [S, R, K], one shape and inner strides
    token_ids: torch.Tensor,             # [T_lora] int64, LoRA tokens grouped by slot
    slots: torch.Tensor,                 # [A] int32, active slot ids
    starts: torch.Tensor,                # [A] int32, each slot's first index into token_ids
    counts: torch.Tensor,                # [A] int32, tokens per active slot
    ranks: torch.Tensor,                 # [A] int32, real rank per active slot (<= R)
    max_count: int,                      # max(counts), host side: sizes the grid without a sync
    *,
    split_k: int | None = None,          # None: enough K splits to fill the device
    block_m: int | None = None,          # block overrides are for tests and tuning
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:                       # [n_slices, T, R] fp32, zero outside LoRA rows / real ranks
    check_stacks(a_stacks, "shrink", same_shape=True)
    n_slices, (T, K), R = len(a_stacks), x.shape, a_stacks[0].shape[1]
    if a_stacks[0].shape[2] != K:
        raise ValueError(f"shrink: x has hidden size {K}, A stacks {a_stacks[0].shape[2]}")
    check_devices("shrink", x, *a_stacks, token_ids, slots, starts, counts, ranks)
    # Zeroed because split-K accumulates into it, and the contract gives 0 outside LoRA rows.
    v = torch.zeros(n_slices, T, R, dtype=torch.float32, device=x.device)
    n_active = slots.shape[0]
    if n_active == 0 or max_count == 0 or T == 0:
        return v

    block_m = block_m or block_m_for(max_count)
    block_n = block_n or min(max(triton.next_power_of_2(R), 16), 128 if block_m <= 32 else 64)
    # Keep the x and A tiles near 4K elements each: big K steps for decode, registers for prefill.
    block_k = block_k or min(256, max(32, 4096 // max(block_m, block_n)),
                             max(16, triton.next_power_of_2(K)))
    m_tiles, n_tiles = triton.cdiv(max_count, block_m), triton.cdiv(R, block_n)
    if split_k is None:
        programs = n_active * n_slices * m_tiles * n_tiles
        # Capped: past ~64 partial sums per output the atomics cost more than the parallelism buys.
        split_k = min(64, triton.next_power_of_2(triton.cdiv(target_programs(x.device), programs)))
    split_k = max(1, min(split_k, triton.cdiv(K, block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty splits

    a0 = a_stacks[0]
    a_table = int64_table([(a.data_ptr(),) for a in a_stacks], x.device) if n_slices > 1 else a0
    kernel = for_device(_shrink_kernel, x.device)
    kernel[(split_k * m_tiles * n_tiles, n_slices, n_active)](
        x, a0, a_table, v,
        token_ids, slots, starts, counts, ranks,
        K, R, k_per_split, n_tiles, split_k,
        x.stride(0), x.stride(1),
        a0.stride(0), a0.stride(1), a0.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        NUM_SLICES=n_slices, ALIGNED=all(a.data_ptr() % 16 == 0 for a in a_stacks), ATOMIC=split_k > 1, PRECISION=dot_precision(a0.dtype),
        DOT_F32=dot_in_fp32(x.device, a0.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4,
    )
    return v
