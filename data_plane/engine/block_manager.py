"""Paged KV-cache bookkeeping: which blocks are free, which request holds which blocks.

The KV tensors themselves live in kv_cache.py; this only hands out block ids. A request
holding n tokens' KV needs ceil(n / block_size) blocks, listed in its block_table.
"""

from __future__ import annotations

from collections import deque

from data_plane.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self.peak_used = 0                 # most blocks ever held at once, to show the budget holds

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, request: Request) -> bool:
        """Room for the KV of all the request's tokens (a prefill, or a recompute after preemption)."""
        return self.blocks_for(request.num_tokens) <= len(self._free)

    def allocate(self, request: Request) -> None:
        if request.block_table:
            raise RuntimeError(f"request {request.request_id} already holds KV blocks")
        need = self.blocks_for(request.num_tokens)
        if need > len(self._free):
            raise RuntimeError("allocate called without can_allocate")
        request.block_table = [self._free.popleft() for _ in range(need)]
        self._note_usage()

    def can_append(self, request: Request) -> bool:
        """Room for the KV of the token a decode step feeds (position num_tokens - 1)."""
        return self._missing(request) <= len(self._free)

    def append(self, request: Request) -> None:
        missing = self._missing(request)
        if missing > len(self._free):
            raise RuntimeError("append called without can_append")
        request.block_table.extend(self._free.popleft() for _ in range(missing))
        self._note_usage()

    def free(self, request: Request) -> None:
        # Most recently used blocks first, so a re-admitted request tends to get warm memory.
        self._free.extendleft(reversed(request.block_table))
        request.block_table = []

    def _missing(self, request: Request) -> int:
        return max(0, self.blocks_for(request.num_tokens) - len(request.block_table))

    def _note_usage(self) -> None:
        self.peak_used = max(self.peak_used, self.num_used)
