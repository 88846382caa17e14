"""The one multi-LoRA op the model calls. Dispatches to Triton on CUDA, to the torch reference elsewhere.

LORAPLANE_LORA_BACKEND=triton forces the Triton kernels (CPU tensors then run in Triton's
interpreter, see kernels.triton_utils.for_device), =torch forces the reference; unset (auto) picks
Triton on CUDA. The choice is made inside the custom ops, at run time, so a compiled graph or a
captured CUDA graph keeps following it.

shrink and expand are torch custom ops (loraplane::lora_shrink, loraplane::lora_expand) with fake
implementations, so torch.compile traces through add_lora without breaking the graph and CUDA graphs
capture the kernels. Custom ops cannot take LoraBatchMeta, hence LoraBatchMeta.kernel_args.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from kernels import cpu_kernel
from kernels.cpu_lora import add_lora_cpu
from kernels.metadata import LoraBatchMeta
from kernels.reference import expand_ref, shrink_ref

BACKEND_ENV = "LORAPLANE_LORA_BACKEND"


def backend_for(device: torch.device) -> str:
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be auto, torch or triton, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return choice


@torch.library.custom_op("loraplane::lora_shrink", mutates_args=())
def lora_shrink(
    x: torch.Tensor,                 # [T, K]
    a_stacks: list[torch.Tensor],    # per slice: [S, R, K]
    sorted_token_ids: torch.Tensor,  # [T_lora] int64
    active_slots: torch.Tensor,      # [A] int32
    slot_starts: torch.Tensor,       # [A] int32
    slot_counts: torch.Tensor,       # [A] int32
    slot_ranks: torch.Tensor,        # [A] int32
    max_count: int,
) -> torch.Tensor:                   # [n_slices, T, R] fp32
    if backend_for(x.device) == "triton":
        from kernels.shrink import shrink  # noqa: PLC0415 - Triton is optional off Linux

        return shrink(x, a_stacks, sorted_token_ids, active_slots, slot_starts, slot_counts,
                      slot_ranks, max_count)
    meta = LoraBatchMeta.from_kernel_args(x.shape[0], sorted_token_ids, active_slots, slot_starts,
                                          slot_counts, slot_ranks, max_count)
    return shrink_ref(x, a_stacks, meta)


@lora_shrink.register_fake
def _lora_shrink_fake(x, a_stacks, sorted_token_ids, active_slots, slot_starts, slot_counts,
                      slot_ranks, max_count):
    return x.new_empty((len(a_stacks), x.shape[0], a_stacks[0].shape[1]), dtype=torch.float32)


@torch.library.custom_op("loraplane::lora_expand", mutates_args=("y",))
def lora_expand(
    y: torch.Tensor,                 # [T, sum(out_i)], updated in place
    v: torch.Tensor,                 # [n_slices, T, R] fp32
    b_stacks: list[torch.Tensor],    # per slice: [S, out_i, R]
    sorted_token_ids: torch.Tensor,  # [T_lora] int64
    active_slots: torch.Tensor,      # [A] int32
    slot_starts: torch.Tensor,       # [A] int32
    slot_counts: torch.Tensor,       # [A] int32
    slot_ranks: torch.Tensor,        # [A] int32
    max_count: int,
    scale: torch.Tensor | None = None,  # [S] fp32, None = 1
) -> None:
    if backend_for(y.device) == "triton":
        from kernels.expand import expand  # noqa: PLC0415 - Triton is optional off Linux

        expand(y, v, b_stacks, sorted_token_ids, active_slots, slot_starts, slot_counts,
               slot_ranks, max_count, scale)
        return
    meta = LoraBatchMeta.from_kernel_args(y.shape[0], sorted_token_ids, active_slots, slot_starts,
                                          slot_counts, slot_ranks, max_count)
    expand_ref(y, v, b_stacks, meta, scale)


@lora_expand.register_fake
def _lora_expand_fake(y, v, b_stacks, sorted_token_ids, active_slots, slot_starts, slot_counts,
                      slot_ranks, max_count, scale=None):
    return None


def add_lora(
    y: torch.Tensor,                       # [T, sum(out_i)] base layer output, updated in place
    x: torch.Tensor,                       # [T, in] layer input
    a_stacks: Sequence[torch.Tensor],      # per slice: [S, R, in]
    b_stacks: Sequence[torch.Tensor],      # per slice: [S, out_i, R] (scaling folded in)
    meta: LoraBatchMeta,
    scale: torch.Tensor | None = None,     # [S] fp32 per-slot scale, None = 1
    cpu_operands: cpu_kernel.Operands | None = None,  # the same A and B, prepared for the CPU kernel
) -> None:
    """y[t, slice i] += scale[slot] * (x[t] @ A_i[slot[t]]^T) @ B_i[slot[t]]^T for every token with slot >= 0.

    Rows of y whose token has slot -1 are not touched. B columns past a slot's real rank must be
    finite (the engine keeps them zero): the Triton expand may read up to 7 of them.
    cpu_operands (LoraSlots makes one per projection on CPU) holds A input-major ([S, in, n * R],
    slices side by side, which one matmul shrinks) and the layout checked once, so the CPU kernel is
    launched without per-call checks, and the torch fallback need not re-derive that layout.
    """
    if meta.max_count == 0:
        return
    if not torch.compiler.is_compiling() and meta.once(f"_backend_{x.device.type}", lambda: backend_for(x.device)) == "torch":
        # Eager CPU: the custom op would rebuild the host lists meta already holds.
        if cpu_operands is None or not cpu_operands.launch(y, x, meta, scale):
            add_lora_cpu(y, x, a_stacks, b_stacks, meta, scale, cpu_operands.a_kmajor if cpu_operands else None)
        return
    args = meta.kernel_args
    v = torch.ops.loraplane.lora_shrink(x, list(a_stacks), *args)
    torch.ops.loraplane.lora_expand(y, v, list(b_stacks), *args, scale)
