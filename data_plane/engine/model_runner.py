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
from data_plane.models.attention import AttentionContext, PrefillSeq
from data_plane.models.llama import LlamaForCausalLM
from kernels import cpu_kernel


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
        """One token for each request of batch.sample that is True, in batch order."""
        sampled = tuple(r for r, s in zip(batch.requests, batch.sample, strict=True) if s)
        if not sampled:  # every request fed a chunk of a prompt that goes on next step
            self.forward(batch)
            return []
        return self.sampler(self.compute_logits(batch), sampled)

    @torch.inference_mode()
    def compute_logits(self, batch: Batch) -> torch.Tensor:
        """[S, vocab] fp32 logits of the next token of each of the S requests batch.sample picks."""
        hidden, bounds = self.forward(batch)
        if batch.num_prefills or not all(batch.sample):  # only the last row of each sampled request
            rows = [end - 1 for (_, end), s in zip(bounds, batch.sample, strict=True) if s]
            hidden = hidden[torch.tensor(rows, device=self.device)]
        return self.model.compute_logits(hidden)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
        """Writes the batch's K/V; returns the hidden states [T, hidden] and each request's rows."""
        requests, bs = batch.requests, self.block_size
        input_ids, positions, seq_of_token, bounds = _batch_tokens(batch)
        ends = [r.num_computed_tokens + n for r, n in zip(requests, batch.num_new, strict=True)]
        tables = _block_tables(requests, ends, bs)
        slot_mapping = tables[seq_of_token, positions // bs] * bs + positions % bs
        prefills = tuple(_prefill_seq(r, bounds[i], tables[i], bs, self.device)
                         for i, (r, n) in enumerate(zip(requests, batch.num_new, strict=True)) if n > 1)
        ctx = AttentionContext(self.kv.k, self.kv.v, slot_mapping.to(self.device), prefills=prefills,
                               sliding_window=self.model.args.sliding_window)
        decoding = [i for i, n in enumerate(batch.num_new) if n == 1]
        if decoding:
            if prefills:  # a decode-only step (the common one) already has its tables
                tables = _block_tables(tuple(requests[i] for i in decoding), [ends[i] for i in decoding], bs)
            ctx.block_tables = tables.to(self.device)
            query_positions = torch.tensor([requests[i].num_computed_tokens for i in decoding])
            ctx.cpu_kernel = cpu_kernel.extension() if self.device.type == "cpu" else None
            if ctx.cpu_kernel is not None:  # reads the blocks in place: no mask to build
                ctx.decode_positions = query_positions
            else:
                ctx.decode_mask = self._decode_mask(query_positions, tables.shape[1] * bs).to(self.device)
        if prefills:  # decode rows among prefill rows; None: every row is a decode token, in order
            ctx.decode_rows = torch.tensor([bounds[i][0] for i in decoding], dtype=torch.int64, device=self.device)
        if self.loras is not None:
            slots = torch.tensor([r.lora_slot for r in requests], dtype=torch.int32)
            self.loras.set_batch(slots[seq_of_token].to(self.device) if (slots >= 0).any() else None)
        return self.model(input_ids.to(self.device), positions.to(self.device), ctx), bounds

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

    Each request feeds its tokens from num_computed_tokens on: a whole prompt, the next chunk of
    one, the rest after a cached prefix, or (a decode) its last token. After preemption that is
    again from position 0, less whatever of it the prefix cache still holds.
    """
    requests = batch.requests
    first = [r.num_computed_tokens for r in requests]
    if not batch.num_prefills:  # the common step: one token per request, vectorised
        n = len(requests)
        bounds = tuple((i, i + 1) for i in range(n))
        return (torch.tensor([r.token_at(p) for r, p in zip(requests, first, strict=True)]), torch.tensor(first),
                torch.arange(n), bounds)
    ids = [torch.tensor(r.token_ids_from(p, n)) for r, p, n in zip(requests, first, batch.num_new, strict=True)]
    lens = torch.tensor(batch.num_new)
    starts = torch.cumsum(lens, 0) - lens
    seq_of_token = torch.repeat_interleave(torch.arange(len(requests)), lens)
    positions = torch.arange(int(lens.sum())) - starts[seq_of_token] + torch.tensor(first)[seq_of_token]
    bounds = tuple((s, s + n) for s, n in zip(starts.tolist(), lens.tolist(), strict=True))
    return torch.cat(ids), positions, seq_of_token, bounds


def _prefill_seq(request: Request, rows: tuple[int, int], table: torch.Tensor, block_size: int,
                 device: torch.device) -> PrefillSeq:
    cached = request.num_computed_tokens
    if not cached:
        return PrefillSeq(*rows)
    blocks = -(-(cached + rows[1] - rows[0]) // block_size)
    return PrefillSeq(*rows, cached=cached, blocks=table[:blocks].to(device))


def _block_tables(requests: tuple[Request, ...], ends: list[int], block_size: int) -> torch.Tensor:
    """[B, max_blocks] int64 over the blocks holding each request's first `ends` tokens, padded with
    block 0 (never read unmasked). Admission reserves a whole prompt's blocks up front; the rest are
    left out, or every decode row would gather (masked) keys a prompt fed in chunks has not written."""
    lengths = [-(-end // block_size) for end in ends]
    width = max(lengths)
    return torch.tensor([r.block_table[:n] + [0] * (width - n) for r, n in zip(requests, lengths, strict=True)])
