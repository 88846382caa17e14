"""Continuous batching: which requests run this step, and how many tokens each feeds.

A step mixes decodes and prompts, and a step's tokens are bounded by max_num_batched_tokens.
Decodes first: every running request whose prompt is done gets one token; when one needs a new KV
block and none is free, the most recently admitted running request is preempted: its blocks are
freed and it goes back to the head of the queue, to be recomputed (prompt + output so far).
Then prompts fill the rest of the step's tokens: first the rest of prompts already running (a
prompt longer than what a step has left is fed in chunks over several steps: chunked prefill),
then waiting requests, admitted in arrival order while the KV cache, max_num_seqs, the token
budget and the adapter slots allow. A request whose adapter is not resident is skipped (it
waits; the ones behind it still run). A request that does not fit the KV cache stops admission,
so a long prompt is not starved by short ones behind it; admission reserves a request's blocks
for its whole prompt at once, so its later chunks never wait for memory, and takes the blocks of
a cached prefix (prefix caching, block_manager.py) as already computed.
A step that preempted feeds no prompt tokens and admits nothing: the blocks just freed are the ones
decode needs.

Adapter residency is owned by the caller (the adapter cache): `adapter_slots` maps an
adapter name to the LoRA slot holding it, and only requests whose adapter is in it run.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from data_plane.engine.block_manager import BlockManager
from data_plane.engine.config import EngineConfig
from data_plane.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class Batch:
    requests: tuple[Request, ...]
    # Per request: the tokens this step feeds, from its num_computed_tokens on: 1 for a decode; a
    # prompt, a recompute after preemption, or a chunk of either otherwise.
    num_new: tuple[int, ...]
    # Per request: this step feeds its last token, so it yields a new one (a chunk that leaves part
    # of the prompt for later steps does not). Fixed at creation: postprocess moves the counters.
    sample: tuple[bool, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample", tuple(r.num_computed_tokens + n == r.num_tokens
                                                 for r, n in zip(self.requests, self.num_new, strict=True)))

    @property
    def adapters(self) -> set[str]:
        return {r.adapter for r in self.requests if r.adapter is not None}

    @property
    def num_prefills(self) -> int:
        """Requests feeding more than one token (the rest take the decode path)."""
        return sum(n > 1 for n in self.num_new)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.adapter_slots: dict[str, int] = {}
        # What an adapter's KV is cached under (Engine.load_adapter's cache_salt): the same bytes only
        # for the same weights, so a name loaded again with other weights never reuses old prefixes.
        self.adapter_salts: dict[str, bytes] = {}
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def adapters_in_use(self) -> set[str]:
        return {r.adapter for r in self.running if r.adapter is not None}

    def schedule(self) -> Batch | None:
        preemptions = self.num_preemptions
        decodes, prompts = self._schedule_decode()
        entries = [(r, 1) for r in decodes]
        if self.num_preemptions == preemptions:
            budget = self.config.max_num_batched_tokens - len(decodes)
            for request in prompts:  # the rest of prompts already running, in admission order
                if budget <= 0:
                    break
                n = min(request.num_uncomputed_tokens, budget)
                entries.append((request, n))
                budget -= n
            entries += self._admit(budget)
        if not entries:
            return None
        for request, _ in entries:
            request.lora_slot = -1 if request.adapter is None else self.adapter_slots[request.adapter]
        # Grouped by slot (stable, base first): each adapter's tokens are then contiguous rows, which
        # the CPU LoRA path reads and writes in place and the kernels read in runs.
        entries.sort(key=lambda e: e[0].lora_slot)
        return Batch(tuple(r for r, _ in entries), tuple(n for _, n in entries))

    def _admit(self, budget: int) -> list[tuple[Request, int]]:
        admitted: list[tuple[Request, int]] = []
        adapters = self.adapters_in_use()
        for request in list(self.waiting):
            if budget <= 0 or len(self.running) + len(admitted) >= self.config.max_num_seqs:
                break
            if request.adapter is not None:
                if request.adapter not in self.adapter_slots:
                    continue
                if request.adapter not in adapters and len(adapters) >= self.config.max_loras:
                    continue
            salt = self.adapter_salts[request.adapter] if request.adapter is not None else b""
            if not self.blocks.can_allocate(request, salt):
                break
            self.blocks.allocate(request, salt)  # a cached prefix counts as computed
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled is None:  # a preempted request's queue time ended the first time
                request.first_scheduled = time.perf_counter()
            n = min(request.num_uncomputed_tokens, budget)
            admitted.append((request, n))
            budget -= n
            if request.adapter is not None:
                adapters.add(request.adapter)
        self.running.extend(r for r, _ in admitted)
        return admitted

    def _schedule_decode(self) -> tuple[list[Request], list[Request]]:
        """(requests decoding this step, with their next KV slot secured; running requests still
        in their prompt, whose blocks admission reserved)."""
        queue = list(self.running)
        scheduled: list[Request] = []
        prompts: list[Request] = []
        while queue:
            request = queue.pop(0)
            if request.num_uncomputed_tokens > 1:
                prompts.append(request)
                continue
            while not self.blocks.can_append(request):
                victim = queue.pop() if queue else request
                self._preempt(victim)
                if victim is request:
                    break
            else:
                self.blocks.append(request)
                scheduled.append(request)
        # Admission order is kept: it decides which request is preempted first, and which prompt
        # gets the step's tokens first.
        self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return scheduled, prompts

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Release a finished or aborted request's KV blocks and forget it."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.blocks.free(request)
        request.status = RequestStatus.FINISHED
