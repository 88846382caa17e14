"""Per-batch LoRA metadata: built once per step, shared by every layer's shrink/expand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LoraBatchMeta:
    token_slots: torch.Tensor       # [T] int32, slot of each token, -1 = base model only
    sorted_token_ids: torch.Tensor  # [T_lora] int64, indices of LoRA tokens grouped by slot
    active_slots: torch.Tensor      # [A] int32, slots used by this batch, ascending
    slot_starts: torch.Tensor       # [A] int32, start of each slot's run in sorted_token_ids
    slot_counts: torch.Tensor       # [A] int32, tokens per active slot
    slot_ranks: torch.Tensor        # [A] int32, real rank of each active slot (<= max rank)
    max_count: int                  # largest slot_counts entry (0 when no LoRA token)
    # Host copies, so the torch path never syncs with the device per layer.
    active_slots_list: tuple[int, ...]
    slot_starts_list: tuple[int, ...]
    slot_counts_list: tuple[int, ...]
    slot_ranks_list: tuple[int, ...]

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """compute(), once per batch: the metadata is immutable and shared by every layer's call, so
        a per-step decision (an environment or build lookup) is made once, not per projection."""
        if key not in self.__dict__:
            object.__setattr__(self, key, compute())
        return self.__dict__[key]

    @property
    def num_lora_tokens(self) -> int:
        return int(self.sorted_token_ids.numel())

    @property
    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, int]:
        """What the custom ops take in place of this dataclass, which they cannot accept:
        (sorted_token_ids, active_slots, slot_starts, slot_counts, slot_ranks, max_count)."""
        return (self.sorted_token_ids, self.active_slots, self.slot_starts, self.slot_counts,
                self.slot_ranks, self.max_count)

    @classmethod
    def from_kernel_args(cls, num_tokens: int, sorted_token_ids: torch.Tensor,
                         active_slots: torch.Tensor, slot_starts: torch.Tensor,
                         slot_counts: torch.Tensor, slot_ranks: torch.Tensor,
                         max_count: int) -> LoraBatchMeta:
        """Inverse of kernel_args, for code behind a custom op. Reads the device: not for CUDA graphs."""
        slots, counts = tuple(active_slots.tolist()), tuple(slot_counts.tolist())
        # Built on the host: torch.repeat_interleave takes milliseconds on CPU for a few slots.
        per_token = [s for s, c in zip(slots, counts, strict=True) for _ in range(c)]
        token_slots = torch.full((num_tokens,), -1, dtype=torch.int32, device=active_slots.device)
        token_slots[sorted_token_ids] = torch.tensor(per_token, dtype=torch.int32).to(token_slots.device)
        return cls(
            token_slots=token_slots, sorted_token_ids=sorted_token_ids, active_slots=active_slots,
            slot_starts=slot_starts, slot_counts=slot_counts, slot_ranks=slot_ranks,
            max_count=max_count,
            active_slots_list=slots,
            slot_starts_list=tuple(slot_starts.tolist()),
            slot_counts_list=counts,
            slot_ranks_list=tuple(slot_ranks.tolist()),
        )

    @classmethod
    def build(cls, token_slots: torch.Tensor, slot_ranks: torch.Tensor | list[int]) -> LoraBatchMeta:
        """token_slots: [T] slot per token (-1 none); slot_ranks: [S] real rank of every slot."""
        device = token_slots.device
        slots_cpu = token_slots.to("cpu", torch.int64)
        ranks_cpu = torch.as_tensor(slot_ranks, dtype=torch.int64).cpu()
        lora = (slots_cpu >= 0).nonzero().flatten()
        # A stable sort keeps each slot's tokens in batch order.
        order = torch.sort(slots_cpu[lora], stable=True).indices
        sorted_ids = lora[order]
        active, counts = torch.unique_consecutive(slots_cpu[sorted_ids], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        ranks = ranks_cpu[active] if active.numel() else active
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            token_slots=token_slots.to(**i32),
            sorted_token_ids=sorted_ids.to(device),
            active_slots=active.to(**i32),
            slot_starts=starts.to(**i32),
            slot_counts=counts.to(**i32),
            slot_ranks=ranks.to(**i32),
            max_count=int(counts.max()) if counts.numel() else 0,
            active_slots_list=tuple(active.tolist()),
            slot_starts_list=tuple(starts.tolist()),
            slot_counts_list=tuple(counts.tolist()),
            slot_ranks_list=tuple(ranks.tolist()),
        )
