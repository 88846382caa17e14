"""Multi-LoRA on CPU (and any device without Triton): a few large torch calls per layer, in place where it can.

Batches in the buffers LoraSlots allocates go to the compiled kernel (kernels/cpu_kernel.py) when
it is built: one call per projection. What follows is the torch path, for hosts that cannot build
the kernel and operands in other layouts.

The reference (kernels/reference.py) loops over (slot, slice) pairs with ~20 small ops each, which at
8 adapters cost more than the base model. This path chooses once per batch (cached on the metadata,
shared by every layer) between two layouts:

- **grouped** (decode: a few tokens per slot): tokens as a padded [G, M] grid over the slot range
  they span; one bmm shrinks every slice at once (when the A slices sit side by side in one
  slot-major buffer, as LoraSlots allocates them) and one bmm per slice expands. When the batch is
  already grouped by slot with equal counts (the engine sorts each batch by slot), the grid is a
  view of x and y: no gather, no scatter.
- **segments** (prefill: many tokens per slot): one matmul per slot shrinks all slices, one addmm_
  per slice adds into y's rows of that slot, at the slot's real rank. In place when each slot's
  tokens are contiguous rows (the engine's order), through a gather and one index_add_ otherwise.

Compute is fp32 whatever the weights' dtype, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels import cpu_kernel
from kernels.metadata import LoraBatchMeta

# Padding waste above this (padded rows / real LoRA rows) means skewed groups (long prefill next to
# single decode tokens): the segments layout does no padded work.
MAX_PADDING_RATIO = 2.0
# Past this many tokens per slot the per-slot matmuls are large enough on their own, and the
# segments layout adds in place instead of materialising a padded [G, M, out] delta.
MAX_TOKENS_PER_SLOT = 32


@dataclass(frozen=True)
class Plan:
    grouped: bool
    first_slot: int            # grouped: the grid covers slots first_slot .. first_slot + groups - 1
    groups: int
    max_count: int
    rank: int                  # grouped: largest real rank among the active slots
    # grouped: [G, 1, r] True past each slot's real rank, or None when all have rank r. A and B past
    # a slot's rank may hold anything (NaN * 0 is NaN inside a matmul), so both are zeroed there.
    past_rank: torch.Tensor | None
    # LoRA tokens are rows lora_rows[0] .. lora_rows[1] - 1 of the batch, in slot order: x and y
    # are read and written in place. None: gather through the index tensors below.
    lora_rows: tuple[int, int] | None
    padded_ids: torch.Tensor | None    # grouped, gathered: [G * M] token of each grid row (0 = padding)
    row_of_token: torch.Tensor | None  # grouped, gathered: [T] grid row of each token; G * M = a zero row


def plan(meta: LoraBatchMeta) -> Plan:
    """The layout for this batch, built once: the metadata is immutable and shared by every layer."""
    return meta.once("_cpu_plan", lambda: _build_plan(meta))


def _build_plan(meta: LoraBatchMeta) -> Plan:
    slots, starts, counts, ranks = (meta.active_slots_list, meta.slot_starts_list, meta.slot_counts_list,
                                    meta.slot_ranks_list)
    first, groups, max_count = slots[0], slots[-1] - slots[0] + 1, meta.max_count
    ids = meta.sorted_token_ids.cpu()
    row0 = int(ids[0])
    in_order = bool(torch.equal(ids, torch.arange(row0, row0 + ids.numel())))
    grouped = max_count <= MAX_TOKENS_PER_SLOT and groups * max_count <= MAX_PADDING_RATIO * meta.num_lora_tokens
    rank = max(ranks)
    past_rank = padded_ids = row_of_token = None
    lora_rows = (row0, row0 + ids.numel()) if in_order else None
    device = meta.sorted_token_ids.device
    if grouped:
        if min(ranks) < rank:
            slot_rank = torch.zeros(groups, dtype=torch.int64)
            slot_rank[torch.tensor(slots) - first] = torch.tensor(ranks)
            past_rank = (torch.arange(rank)[None, :] >= slot_rank[:, None]).unsqueeze(1).to(device)
        if not (in_order and groups == len(slots) and min(counts) == max_count):
            lora_rows = None  # the grid has holes: gather into it
            padded = torch.zeros(groups, max_count, dtype=torch.int64)
            valid = torch.zeros(groups, max_count, dtype=torch.bool)
            for slot, start, count in zip(slots, starts, counts, strict=True):
                padded[slot - first, :count] = ids[start:start + count]
                valid[slot - first, :count] = True
            row_of_token = torch.full((meta.token_slots.numel(),), groups * max_count, dtype=torch.int64)
            row_of_token[padded.flatten()[valid.flatten()]] = valid.flatten().nonzero().flatten()
            padded_ids, row_of_token = padded.flatten().to(device), row_of_token.to(device)
    return Plan(grouped, first, groups, max_count, rank, past_rank, lora_rows, padded_ids, row_of_token)


def kmajor(a_stacks: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """[S, in, n * R] over the n A slices when they are column blocks of one such buffer, else None."""
    a0 = a_stacks[0]
    S, R, K = a0.shape
    n = len(a_stacks)
    if a0.stride() != (K * n * R, 1, n * R):
        return None
    step = R * a0.element_size()
    for i, a in enumerate(a_stacks):
        if a.shape != a0.shape or a.stride() != a0.stride() or a.data_ptr() != a0.data_ptr() + i * step:
            return None
    return torch.as_strided(a0, (S, K, n * R), (K * n * R, n * R, 1))


def add_lora_cpu(
    y: torch.Tensor,                       # [T, sum(out_i)], updated in place
    x: torch.Tensor,                       # [T, in]
    a_stacks: Sequence[torch.Tensor],      # per slice: [S, R, in]
    b_stacks: Sequence[torch.Tensor],      # per slice: [S, out_i, R]; finite past each slot's rank
    meta: LoraBatchMeta,
    scale: torch.Tensor | None = None,     # [S] per-slot scale, None = 1
    a_kmajor: torch.Tensor | None = None,  # [S, in, n * R]: the same A, input dimension first
) -> None:
    a_t = a_kmajor if a_kmajor is not None else kmajor(a_stacks)
    if cpu_kernel.usable(y, x, a_t, b_stacks, meta):
        cpu_kernel.add_lora(y, x, a_t, b_stacks, meta, scale)
        return
    p = plan(meta)
    (_grouped if p.grouped else _segments)(y, x, a_stacks, b_stacks, a_t, meta, p, scale)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _grouped(y, x, a_stacks, b_stacks, a_t, meta: LoraBatchMeta, p: Plan, scale) -> None:
    G, M, r, R = p.groups, p.max_count, p.rank, a_stacks[0].shape[1]
    lo, hi = p.first_slot, p.first_slot + p.groups
    # Every slot at full rank (the common decode batch): whole buffers, no slicing. A decode step
    # runs this 4 times per layer, and each skipped view op is a few microseconds of dispatch.
    whole = lo == 0 and hi == a_stacks[0].shape[0] and r == R
    if p.lora_rows is None:
        xs = _f32(x.index_select(0, p.padded_ids).view(G, M, -1))
    elif p.lora_rows == (0, x.shape[0]):
        xs = _f32(x.reshape(G, M, -1))
    else:
        xs = _f32(x[p.lora_rows[0]:p.lora_rows[1]].reshape(G, M, -1))
    if a_t is not None and r == R:
        v = torch.bmm(xs, _f32(a_t if whole else a_t[lo:hi]))                   # [G, M, n * R]
        vs = v.split(R, dim=2) if len(a_stacks) > 1 else (v,)
    else:
        vs = [torch.bmm(xs, _f32(a[lo:hi, :r]).transpose(1, 2)) for a in a_stacks]  # each [G, M, r]
    deltas = []
    for v, b in zip(vs, b_stacks, strict=True):
        if p.past_rank is not None:
            v = v.masked_fill(p.past_rank, 0)
        if scale is not None:
            v = v * _f32(scale[lo:hi]).view(G, 1, 1)
        b = _f32(b if whole else b[lo:hi, :, :r])                                # [G, out_i, r]
        if p.past_rank is not None:  # a copy: B may hold NaN past a slot's rank too, and NaN * 0 is NaN
            b = b.masked_fill(p.past_rank, 0)
        deltas.append(torch.bmm(v, b.transpose(1, 2)))                          # [G, M, out_i]
    delta = (deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=2)).view(G * M, -1)
    if delta.dtype != y.dtype:
        delta = delta.to(y.dtype)
    if p.lora_rows is not None:
        (y if p.lora_rows == (0, y.shape[0]) else y[p.lora_rows[0]:p.lora_rows[1]]).add_(delta)
        return
    if meta.num_lora_tokens < meta.token_slots.numel():  # base tokens read an appended zero row
        delta = torch.cat([delta, delta.new_zeros(1, delta.shape[1])])
    # Every token is in exactly one grid row: gather back to token order and add densely.
    y += delta.index_select(0, p.row_of_token)


def _segments(y, x, a_stacks, b_stacks, a_t, meta: LoraBatchMeta, p: Plan, scale) -> None:
    f32 = torch.float32
    widths = [b.shape[1] for b in b_stacks]
    R = a_stacks[0].shape[1]
    # fp32 y takes the fp32 products directly; other dtypes round once, at the end, as the reference does.
    in_place = p.lora_rows is not None and y.dtype == f32
    xs_all = x[p.lora_rows[0]:p.lora_rows[1]] if p.lora_rows is not None else x.index_select(0, meta.sorted_token_ids)
    out = y if in_place else torch.zeros(meta.num_lora_tokens, sum(widths), dtype=f32, device=y.device)
    row0 = p.lora_rows[0] if in_place else 0
    for slot, start, count, rank in zip(meta.active_slots_list, meta.slot_starts_list, meta.slot_counts_list,
                                        meta.slot_ranks_list, strict=True):
        xs = _f32(xs_all[start:start + count])
        if a_t is not None and rank == R:
            v = xs @ _f32(a_t[slot])                                            # [count, n * R]
            vs = [v[:, i * R:i * R + rank] for i in range(len(a_stacks))]
        else:
            vs = [xs @ _f32(a[slot, :rank]).t() for a in a_stacks]
        rows = slice(row0 + start, row0 + start + count)
        offset = 0
        for v, b, width in zip(vs, b_stacks, widths, strict=True):
            if scale is not None:
                v = v * scale[slot].to(f32)
            out[rows, offset:offset + width].addmm_(v, _f32(b[slot, :, :rank]).t())
            offset += width
    if in_place:
        return
    if p.lora_rows is not None:
        y[p.lora_rows[0]:p.lora_rows[1]] += out.to(y.dtype)
    else:
        y.index_add_(0, meta.sorted_token_ids, out.to(y.dtype))
