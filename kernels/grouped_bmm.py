"""Multi-LoRA on CPU (and any device without Triton) as a few batched matmuls per layer.

The reference (kernels/reference.py) loops over active slots and slices: ~20 small torch ops per
(slot, slice), which at 8 adapters dominated a CPU decode step. Here the tokens of each slot are
packed into a padded [G, M, in] block once per batch (shared by every layer), each slice is shrunk
and expanded with one bmm straight against the slot buffers, and the result is gathered back to
token order and added densely. Same math as the reference, fp32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.metadata import LoraBatchMeta

# Padding waste above this (padded rows / real LoRA rows) means skewed groups (long prefill next to
# single decode tokens), where the per-slot loop of the reference does less work.
MAX_PADDING_RATIO = 2.0
# Past this many tokens per slot (prefill) the per-slot matmuls of the reference are already large
# and it was faster (measured at hidden 512: 21 ms vs 33 ms a layer at 1024 tokens over 8 slots).
MAX_TOKENS_PER_SLOT = 32


@dataclass(frozen=True)
class PackedTokens:
    padded_ids: torch.Tensor   # [G * M] int64, token of each padded row (0 for padding)
    row_of_token: torch.Tensor  # [T] int64, padded row holding each token; G * M (a zero row) for base tokens
    has_base: bool             # some tokens run the base model only
    first_slot: int            # groups are slots first_slot .. first_slot + G - 1
    groups: int
    max_count: int
    rank: int                  # largest real rank among the active slots
    # [G, 1, r] True past each slot's real rank, or None when all have rank r: slot buffer padding
    # is not guaranteed zero, and NaN * 0 is NaN inside a matmul.
    past_rank: torch.Tensor | None


def pack(meta: LoraBatchMeta) -> PackedTokens | None:
    """The padded layout for this batch, or None when padding would waste more than it saves.

    Groups are the contiguous slot range spanning the active slots, so the slot buffers are used
    as views: copying each layer's active A and B rows cost more than the matmuls themselves.
    """
    cached = meta.__dict__.get("_packed", False)
    if cached is not False:
        return cached
    first, last = meta.active_slots_list[0], meta.active_slots_list[-1]
    groups, max_count = last - first + 1, meta.max_count
    packed = None
    if max_count <= MAX_TOKENS_PER_SLOT and groups * max_count <= MAX_PADDING_RATIO * meta.num_lora_tokens:
        device = meta.sorted_token_ids.device
        padded = torch.zeros(groups, max_count, dtype=torch.int64)
        valid = torch.zeros(groups, max_count, dtype=torch.bool)
        ranks = torch.zeros(groups, dtype=torch.int64)
        ids = meta.sorted_token_ids.cpu()
        for slot, start, count, rank in zip(meta.active_slots_list, meta.slot_starts_list, meta.slot_counts_list,
                                            meta.slot_ranks_list, strict=True):
            padded[slot - first, :count] = ids[start:start + count]
            valid[slot - first, :count] = True
            ranks[slot - first] = rank
        row_of_token = torch.full((meta.token_slots.numel(),), groups * max_count, dtype=torch.int64)
        row_of_token[padded.flatten()[valid.flatten()]] = valid.flatten().nonzero().flatten()
        rank = max(meta.slot_ranks_list)
        past_rank = None
        if min(meta.slot_ranks_list) < rank:
            past_rank = (torch.arange(rank)[None, :] >= ranks[:, None]).unsqueeze(1).to(device)
        packed = PackedTokens(padded.flatten().to(device), row_of_token.to(device),
                              meta.num_lora_tokens < meta.token_slots.numel(), first, groups, max_count, rank,
                              past_rank)
    # The metadata is immutable and shared by every layer of the step: decide and build once.
    object.__setattr__(meta, "_packed", packed)
    return packed


def add_lora_grouped(
    y: torch.Tensor,                       # [T, sum(out_i)], updated in place
    x: torch.Tensor,                       # [T, in]
    a_stacks,                              # per slice: [S, R, in]
    b_stacks,                              # per slice: [S, out_i, R]
    packed: PackedTokens,
    scale: torch.Tensor | None = None,     # [S] per-slot scale, None = 1
) -> None:
    G, M, r = packed.groups, packed.max_count, packed.rank
    lo, hi = packed.first_slot, packed.first_slot + packed.groups
    compute = torch.float32
    xs = x.index_select(0, packed.padded_ids).view(G, M, -1).to(compute)        # [G, M, in]
    offset = 0
    for a, b in zip(a_stacks, b_stacks, strict=True):
        width = b.shape[1]
        v = torch.bmm(xs, a[lo:hi, :r].to(compute).transpose(1, 2))             # [G, M, r]
        if packed.past_rank is not None:
            v.masked_fill_(packed.past_rank, 0)
        if scale is not None:
            v.mul_(scale[lo:hi].view(G, 1, 1).to(compute))
        b_view = b[lo:hi, :, :r].to(compute)                                      # [G, out_i, r]
        if packed.past_rank is not None:  # mixed ranks: a copy, so padding never meets the zeros of v
            b_view = b_view.masked_fill(packed.past_rank, 0)
        delta = torch.bmm(v, b_view.transpose(1, 2)).view(G * M, width)          # [G*M, out_i]
        if packed.has_base:  # base tokens read an appended zero row
            delta = torch.cat([delta, delta.new_zeros(1, width)])
        # Every token is in exactly one row: gather back to token order and add densely (an
        # index_add_ into the strided slice of y cost more than both matmuls).
        y[:, offset:offset + width] += delta.index_select(0, packed.row_of_token).to(y.dtype)
        offset += width
