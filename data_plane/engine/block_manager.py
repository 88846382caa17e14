"""Paged KV-cache bookkeeping: which blocks are free, which request holds which blocks, and which
blocks hold a known prefix (prefix caching).

The KV tensors themselves live in kv_cache.py; this only hands out block ids. A request
holding n tokens' KV needs ceil(n / block_size) blocks, listed in its block_table.

Prefix caching: once a block is full of computed tokens, it is registered under a digest of
everything before and in it (the adapter's identity, then every token), so a later request with
the same prefix on the same adapter takes those blocks instead of recomputing them. Several
requests can hold one block; a block returns to the free list when none does, and keeps its
digest there until it is handed out again: free cached blocks are evicted least recently
freed first, after every free block that holds nothing reusable. A shared block is never
written: a request only reuses whole blocks before its last prompt token, and writes from the
next block on.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from data_plane.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Handed out from the front. Freed blocks holding a reusable prefix go to the back, the
        # others to the front (warm memory for the next request).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._digest_of: dict[int, bytes] = {}   # block -> digest of the prefix it completes
        self._cached: dict[bytes, int] = {}      # digest -> block holding that prefix
        self.peak_used = 0                       # most blocks ever held at once, to show the budget holds
        self.prefix_queries = 0                  # prompt tokens looked up at admission
        self.prefix_hits = 0                     # of those, found in the cache

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a reusable prefix, in use or free."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, request: Request, salt: bytes = b"") -> bool:
        """Room for the KV of all the request's tokens (a prefill, or a recompute after preemption),
        counting the blocks its cached prefix already holds."""
        return self._fits(request, self._prefix_hits(request, salt))

    def allocate(self, request: Request, salt: bytes = b"") -> None:
        """Reserve the request's blocks; its cached prefix is taken as computed (num_computed_tokens).

        `salt` names what the KV depends on besides the tokens: the adapter, as loaded."""
        if request.block_table:
            raise RuntimeError(f"request {request.request_id} already holds KV blocks")
        hits = self._prefix_hits(request, salt)
        if not self._fits(request, hits):
            raise RuntimeError("allocate called without can_allocate")
        for block in hits:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        fresh = [self._take() for _ in range(self.blocks_for(request.num_tokens) - len(hits))]
        request.block_table = hits + fresh
        request.num_computed_tokens = len(hits) * self.block_size
        request.num_committed_blocks = len(hits)
        if self.enable_prefix_caching and not request.num_preemptions:  # prompts, not recomputes
            self.prefix_queries += request.num_tokens
            self.prefix_hits += request.num_computed_tokens
        self._note_usage()

    def can_append(self, request: Request) -> bool:
        """Room for the KV of the token a decode step feeds (position num_tokens - 1)."""
        return self._missing(request) <= len(self._free)

    def append(self, request: Request) -> None:
        missing = self._missing(request)
        if missing > len(self._free):
            raise RuntimeError("append called without can_append")
        request.block_table.extend(self._take() for _ in range(missing))
        self._note_usage()

    def commit(self, request: Request) -> None:
        """After a step: register the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        full = min(request.num_computed_tokens // self.block_size, len(request.block_table))
        for i in range(request.num_committed_blocks, full):
            if i == len(request.block_digests):
                request.block_digests.append(self._digest(request, i))
            digest, block = request.block_digests[i], request.block_table[i]
            if digest not in self._cached and block not in self._digest_of:
                self._cached[digest] = block
                self._digest_of[block] = digest
        request.num_committed_blocks = max(request.num_committed_blocks, full)

    def free(self, request: Request) -> None:
        # Last blocks first, so a free list that must evict loses the ends of prefixes before their starts.
        for i in reversed(range(len(request.block_table))):
            block = request.block_table[i]
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if i < request.num_committed_blocks and block not in self._digest_of:
                # A duplicate of a registered block (two requests computed one prefix at once): it
                # takes over the digest if the registered copy has been evicted meanwhile.
                digest = request.block_digests[i]
                if digest not in self._cached:
                    self._cached[digest] = block
                    self._digest_of[block] = digest
            self._free[block] = None
            self._free.move_to_end(block, last=block in self._digest_of)
        request.block_table = []

    def reset_prefix_stats(self) -> None:
        """Zero the hit counters (after a warm-up, say); the cache itself is kept."""
        self.prefix_queries = self.prefix_hits = 0

    def _fits(self, request: Request, hits: list[int]) -> bool:
        reused_free = sum(1 for b in hits if self._refs[b] == 0)  # cached blocks on the free list
        return self.blocks_for(request.num_tokens) - len(hits) <= len(self._free) - reused_free

    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        digest = self._digest_of.pop(block, None)
        if digest is not None:
            del self._cached[digest]
        self._refs[block] = 1
        return block

    def _prefix_hits(self, request: Request, salt: bytes) -> list[int]:
        """Blocks already holding the request's leading full blocks; its last token is always left
        to compute, since sampling needs its logits."""
        if not self.enable_prefix_caching:
            return []
        if request.digest_salt != salt:
            request.digest_salt, request.block_digests = salt, []
        hits: list[int] = []
        for i in range((request.num_tokens - 1) // self.block_size):
            if i == len(request.block_digests):
                request.block_digests.append(self._digest(request, i))
            block = self._cached.get(request.block_digests[i])
            if block is None:
                break
            hits.append(block)
        return hits

    def _digest(self, request: Request, index: int) -> bytes:
        parent = request.block_digests[index - 1] if index else request.digest_salt
        tokens = request.token_ids_from(index * self.block_size, self.block_size)
        return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()  # "q": 8 bytes everywhere

    def _missing(self, request: Request) -> int:
        return max(0, self.blocks_for(request.num_tokens) - len(request.block_table))

    def _note_usage(self) -> None:
        self.peak_used = max(self.peak_used, self.num_used)
