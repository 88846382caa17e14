"""Continuous batching: which requests run this step. One batch mixes decodes and prefills.

Decodes first: every running request gets one token; when a request needs a new KV block and
none is free, the most recently admitted running request is preempted: its blocks are freed and
it goes back to the head of the queue, to be recomputed (prompt + output so far).
Then prefills join the same batch, so a new prompt never stalls the running requests for a step
of its own: waiting requests are admitted in arrival order while the KV cache, max_num_seqs,
max_num_batched_tokens (decode tokens included) and the adapter slots allow. A request whose
adapter is not resident is skipped (it waits; the ones behind it still run). A request that does
not fit the KV cache stops admission, so a long prompt is not starved by short ones behind it.
No request is admitted in a step that preempted: the blocks just freed are the ones decode needs.

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
    # Per request: True feeds its whole sequence (a prefill, or a recompute after preemption),
    # False the one token of a decode step.
    prefill: tuple[bool, ...]

    @property
    def adapters(self) -> set[str]:
        return {r.adapter for r in self.requests if r.adapter is not None}

    @property
    def num_prefills(self) -> int:
        return sum(self.prefill)


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
        preemptions = self.num_preemptions
        decodes = self._schedule_decode()
        prefills = self._admit(len(decodes)) if self.num_preemptions == preemptions else []
        if not decodes and not prefills:
            return None
        entries = [(r, False) for r in decodes] + [(r, True) for r in prefills]
        for request, _ in entries:
            request.lora_slot = -1 if request.adapter is None else self.adapter_slots[request.adapter]
        # Grouped by slot (stable, base first): each adapter's tokens are then contiguous rows, which
        # the CPU LoRA path reads and writes in place and the kernels read in runs.
        entries.sort(key=lambda e: e[0].lora_slot)
        return Batch(tuple(r for r, _ in entries), tuple(p for _, p in entries))

    def _admit(self, decode_tokens: int) -> list[Request]:
        admitted: list[Request] = []
        adapters = self.adapters_in_use()
        tokens = decode_tokens
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
        self.running.extend(admitted)
        return admitted

    def _schedule_decode(self) -> list[Request]:
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
        self.running = list(scheduled)  # admission extends running, not this step's decodes
        return scheduled

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
