"""Continuous batching: which requests run this step, as one prefill batch or one decode batch.

Prefill first: waiting requests are admitted in arrival order while the KV cache, max_num_seqs,
max_num_batched_tokens and the adapter slots allow. A request whose adapter is not resident
is skipped (it waits; the ones behind it still run). A request that does not fit the KV cache
stops admission, so a long prompt is not starved by short ones behind it.
Otherwise decode: every running request gets one token; when a request needs a new KV block
and none is free, the most recently admitted running request is preempted: its blocks are
freed and it goes back to the head of the queue, to be recomputed (prompt + output so far).

Adapter residency is owned by the caller (the adapter cache): `adapter_slots` maps an
adapter name to the LoRA slot holding it, and only requests whose adapter is in it run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from data_plane.engine.block_manager import BlockManager
from data_plane.engine.config import EngineConfig
from data_plane.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class Batch:
    requests: tuple[Request, ...]
    is_prefill: bool

    @property
    def adapters(self) -> set[str]:
        return {r.adapter for r in self.requests if r.adapter is not None}


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.adapter_slots: dict[str, int] = {}
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def adapters_in_use(self) -> set[str]:
        return {r.adapter for r in self.running if r.adapter is not None}

    def schedule(self) -> Batch | None:
        batch = self._schedule_prefill() or self._schedule_decode()
        if batch is None:
            return None
        for request in batch.requests:
            request.lora_slot = -1 if request.adapter is None else self.adapter_slots[request.adapter]
        # Grouped by slot (stable, base first): each adapter's tokens are then contiguous rows, which
        # the CPU LoRA path reads and writes in place and the kernels read in runs.
        return Batch(tuple(sorted(batch.requests, key=lambda r: r.lora_slot)), batch.is_prefill)

    def _schedule_prefill(self) -> Batch | None:
        admitted: list[Request] = []
        adapters = self.adapters_in_use()
        tokens = 0
        for request in list(self.waiting):
            if len(self.running) + len(admitted) >= self.config.max_num_seqs:
                break
            if request.adapter is not None:
                if request.adapter not in self.adapter_slots:
                    continue
                if request.adapter not in adapters and len(adapters) >= self.config.max_loras:
                    continue
            if tokens + request.num_tokens > self.config.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(request):
                break
            self.blocks.allocate(request)
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            admitted.append(request)
            tokens += request.num_tokens
            if request.adapter is not None:
                adapters.add(request.adapter)
        if not admitted:
            return None
        self.running.extend(admitted)
        return Batch(tuple(admitted), is_prefill=True)

    def _schedule_decode(self) -> Batch | None:
        queue = list(self.running)
        scheduled: list[Request] = []
        while queue:
            request = queue.pop(0)
            while not self.blocks.can_append(request):
                victim = queue.pop() if queue else request
                self._preempt(victim)
                if victim is request:
                    break
            else:
                self.blocks.append(request)
                scheduled.append(request)
        self.running = scheduled
        return Batch(tuple(scheduled), is_prefill=False) if scheduled else None

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request)
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
