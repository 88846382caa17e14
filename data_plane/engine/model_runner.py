"""Turns a scheduled batch into tensors, runs the model once, and samples one token per request.

Inputs are built with a handful of vectorised ops per step (no per-token Python), on the host,
then moved to the device in one go per tensor.
"""

from __future__ import annotations

import torch

from data_plane.engine.kv_cache import KVCache
from data_plane.engine.request import Request
from data_plane.engine.sampler import Sampler
from data_plane.engine.scheduler import Batch
from data_plane.lora.layers import LoraSlots
from data_plane.models.attention import AttentionContext
from data_plane.models.llama import LlamaForCausalLM


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv: KVCache, block_size: int, loras: LoraSlots | None,
                 device: torch.device):
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.loras = loras
        self.device = device
        self.sampler = Sampler()

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[int]:
        return self.sampler(self.compute_logits(batch), batch.requests)

    @torch.inference_mode()
    def compute_logits(self, batch: Batch) -> torch.Tensor:
        """[B, vocab] fp32 logits of each request's next token."""
        requests, bs = batch.requests, self.block_size
        input_ids, positions, seq_of_token, bounds = _batch_tokens(batch)
        tables = _block_tables(requests)
        slot_mapping = tables[seq_of_token, positions // bs] * bs + positions % bs
        ctx = AttentionContext(self.kv.k, self.kv.v, slot_mapping.to(self.device),
                               seq_bounds=tuple(b for b, p in zip(bounds, batch.prefill, strict=True) if p),
                               sliding_window=self.model.args.sliding_window)
        decoding = [i for i, p in enumerate(batch.prefill) if not p]
        if decoding:
            if batch.num_prefills:  # a decode-only step (the common one) already has its tables
                tables = _block_tables(tuple(requests[i] for i in decoding))
            ctx.block_tables = tables.to(self.device)
            ctx.decode_mask = self._decode_mask(torch.tensor([requests[i].num_tokens - 1 for i in decoding]),
                                                tables.shape[1] * bs).to(self.device)
        if batch.num_prefills:  # decode rows among prefill rows; None: every row is a decode token, in order
            ctx.decode_rows = torch.tensor([bounds[i][0] for i in decoding], dtype=torch.int64, device=self.device)
        if self.loras is not None:
            slots = torch.tensor([r.lora_slot for r in requests], dtype=torch.int32)
            self.loras.set_batch(slots[seq_of_token].to(self.device) if (slots >= 0).any() else None)
        hidden = self.model(input_ids.to(self.device), positions.to(self.device), ctx)
        if batch.num_prefills:  # only each sequence's last token is sampled from
            hidden = hidden[torch.tensor([end - 1 for _, end in bounds], device=self.device)]
        return self.model.compute_logits(hidden)

    def _decode_mask(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """[B, 1, 1, L] additive: key j is visible to the query at position p when j <= p (and in the window)."""
        keys = torch.arange(length)[None, :]
        visible = keys <= positions[:, None]
        window = self.model.args.sliding_window
        if window is not None:
            visible &= keys > positions[:, None] - window
        mask = torch.zeros(visible.shape, dtype=self.kv.k.dtype).masked_fill_(~visible, float("-inf"))
        return mask[:, None, None, :]


def _batch_tokens(batch: Batch):
    """Flat input ids, positions, sequence index of each token, [start, end) of each sequence's rows.

    A prefill feeds its whole sequence from position 0: there is no prefix cache, and preemption
    recomputes. A decode feeds its last token, at the position after its cached ones.
    """
    requests = batch.requests
    if not batch.num_prefills:  # the common step: one token per request, vectorised
        n = len(requests)
        bounds = tuple((i, i + 1) for i in range(n))
        return (torch.tensor([r.last_token_id for r in requests]), torch.tensor([r.num_tokens - 1 for r in requests]),
                torch.arange(n), bounds)
    ids = [torch.tensor(r.all_token_ids if p else [r.last_token_id]) for r, p in zip(requests, batch.prefill,
                                                                                     strict=True)]
    lens = torch.tensor([len(t) for t in ids])
    first = torch.tensor([0 if p else r.num_tokens - 1 for r, p in zip(requests, batch.prefill, strict=True)])
    starts = torch.cumsum(lens, 0) - lens
    seq_of_token = torch.repeat_interleave(torch.arange(len(requests)), lens)
    positions = torch.arange(int(lens.sum())) - starts[seq_of_token] + first[seq_of_token]
    bounds = tuple((s, s + n) for s, n in zip(starts.tolist(), lens.tolist(), strict=True))
    return torch.cat(ids), positions, seq_of_token, bounds


def _block_tables(requests: tuple[Request, ...]) -> torch.Tensor:
    """[B, max_blocks] int64, padded with block 0 (never read unmasked)."""
    width = max(len(r.block_table) for r in requests)
    return torch.tensor([r.block_table + [0] * (width - len(r.block_table)) for r in requests])
