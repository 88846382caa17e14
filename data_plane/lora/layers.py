"""Multi-LoRA projections: stacked per-slot weights next to each packed base projection.

`LoraSlots(model, spec, max_loras, max_rank)` wraps every packed projection of a built
model in a `LoraLinear` and allocates, once, for each slice of it (q, k, v of qkv_proj,
gate, up of gate_up_proj, ...) A [max_loras, max_rank, in] and B [max_loras, out, max_rank].
A slot holds one adapter: `load_adapter(slot, adapter)` copies a NormalizedAdapter in
(scaling is already folded into B; rows past the adapter's rank, and modules or layers it
does not touch, stay zero), `clear_slot(slot)` empties it. Per step the model runner calls
`set_batch(token_slots)` with the slot of every token (-1 = base model only); all layers
share the metadata built from it.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import cpu_kernel
from kernels.metadata import LoraBatchMeta
from kernels.ops import add_lora
from loraplane.adapter_format import NormalizedAdapter
from loraplane.errors import LoraplaneError, invalid_argument
from loraplane.model_spec import ModelSpec
from loraplane.v1 import errors_pb2 as R


class LoraBatch:
    """The current step's token->slot metadata, shared by every LoraLinear of one model."""

    def __init__(self) -> None:
        self.meta: LoraBatchMeta | None = None


class LoraLinear(nn.Module):
    """y = base(x) + per-token LoRA of the token's slot, for each output slice."""

    def __init__(self, base: nn.Linear, out_slices: tuple[int, ...], max_loras: int, max_rank: int,
                 batch: LoraBatch):
        super().__init__()
        self.base = base
        self.batch = batch
        w = base.weight
        kw = dict(dtype=w.dtype, device=w.device)
        n, r, d_in = len(out_slices), max_rank, w.shape[1]
        self.lora_a_kmajor: torch.Tensor | None = None
        self.cpu_operands: cpu_kernel.Operands | None = None
        if w.device.type == "cpu":
            # Input dimension first for A ([S, in, slices x R], one slot's q, k and v columns side by side)
            # and B ([S, R, out]): the CPU bmm streams both without repacking (measured 1.8x faster
            # for the decode shrink than A as [S, R, in]), and one matmul shrinks every slice. The
            # kernels' [S, R, in] / [S, out, R] stacks are views of these buffers.
            self.lora_a_kmajor = torch.zeros(max_loras, d_in, n * r, **kw)
            self.lora_a = tuple(self.lora_a_kmajor[:, :, i * r:(i + 1) * r].transpose(1, 2) for i in range(n))
            self.lora_b = tuple(torch.zeros(max_loras, r, out, **kw).transpose(1, 2) for out in out_slices)
            self.cpu_operands = cpu_kernel.Operands(self.lora_a_kmajor, self.lora_b)
        else:
            self.lora_a = tuple(torch.zeros(max_loras, r, d_in, **kw) for _ in out_slices)
            self.lora_b = tuple(torch.zeros(max_loras, out, r, **kw) for out in out_slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        meta = self.batch.meta
        if meta is not None and meta.max_count:
            add_lora(y, x, self.lora_a, self.lora_b, meta, cpu_operands=self.cpu_operands)
        return y


class LoraSlots:
    """Owns the LoRA slot buffers of one model and the rank of the adapter in each slot."""

    def __init__(self, model: nn.Module, spec: ModelSpec, packed_modules: dict[str, tuple[str, ...]],
                 max_loras: int, max_rank: int):
        self.spec = spec
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.slot_ranks = [0] * max_loras
        self.batch = LoraBatch()
        # (layer, checkpoint module) -> (LoraLinear, slice index): where an adapter's pair goes.
        self._targets: dict[tuple[int, str], tuple[LoraLinear, int]] = {}
        self.linears: list[LoraLinear] = []  # every wrapped projection, for inspection and clearing
        for name, module in list(model.named_modules()):
            for packed, parts in packed_modules.items():
                base = getattr(module, packed, None)
                if not isinstance(base, nn.Linear):
                    continue
                layer = _layer_index(name)
                outs = tuple(spec.module_dims(m)[1] for m in parts)
                wrapped = LoraLinear(base, outs, max_loras, max_rank, self.batch)
                setattr(module, packed, wrapped)
                self.linears.append(wrapped)
                for i, part in enumerate(parts):
                    self._targets[(layer, part)] = (wrapped, i)
        if len(self._targets) != 7 * spec.num_layers:
            raise ValueError(f"found {len(self._targets)} LoRA targets, expected {7 * spec.num_layers}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lin in self.linears for t in lin.lora_a + lin.lora_b)

    def load_adapter(self, slot: int, adapter: NormalizedAdapter) -> None:
        """Copy `adapter` into `slot`, replacing whatever was there. Checked fully before any write."""
        self.check_slot(slot)
        pairs = self.check_adapter(adapter)
        self.clear_slot(slot)
        with torch.no_grad():
            for layer, module, a, b in pairs:
                linear, i = self._targets[(layer, module)]
                r = a.shape[0]
                linear.lora_a[i][slot, :r].copy_(a)
                linear.lora_b[i][slot, :, :r].copy_(b)
        self.slot_ranks[slot] = adapter.rank

    def check_adapter(self, adapter: NormalizedAdapter) -> list[tuple[int, str, torch.Tensor, torch.Tensor]]:
        """Raise the LoraplaneError that loading `adapter` into any slot would (rank above max_rank,
        shapes that do not fit this model); else its (layer, module, A, B) pairs. Reads only what is
        fixed at construction, so any thread may call it."""
        if adapter.rank > self.max_rank:
            raise LoraplaneError(R.ERROR_REASON_RANK_TOO_LARGE,
                                 f"adapter rank {adapter.rank} is above max_lora_rank {self.max_rank}",
                                 {"rank": str(adapter.rank), "max_rank": str(self.max_rank)})
        pairs = list(adapter.pairs())
        for layer, module, a, b in pairs:
            target = self._targets.get((layer, module))
            d_in, d_out = self.spec.module_dims(module) if target else (0, 0)
            r = a.shape[0] if a.dim() == 2 else -1
            if target is None or a.shape != (r, d_in) or b.shape != (d_out, r) or r > adapter.rank:
                raise LoraplaneError(R.ERROR_REASON_ADAPTER_INCOMPATIBLE,
                                     f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B "
                                     f"{tuple(b.shape)} do not fit this model", {"module": module})
        return pairs

    def clear_slot(self, slot: int) -> None:
        self.check_slot(slot)
        for linear in self.linears:
            for t in linear.lora_a + linear.lora_b:
                t[slot].zero_()
        self.slot_ranks[slot] = 0

    def set_batch(self, token_slots: torch.Tensor | None) -> None:
        """token_slots [T] (-1 = base) for the next forward; None for a base-only forward."""
        if token_slots is None:
            self.batch.meta = None
            return
        self.batch.meta = LoraBatchMeta.build(token_slots, self.slot_ranks)

    def check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.max_loras:
            raise invalid_argument("slot", f"slot must be an integer in [0, {self.max_loras}), got {slot!r}")


def _layer_index(module_name: str) -> int:
    # "model.layers.3.self_attn" -> 3
    parts = module_name.split(".")
    return int(parts[parts.index("layers") + 1])
