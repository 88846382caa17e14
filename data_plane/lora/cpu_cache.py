"""CPU tier: normalized adapters in host memory, LRU within a count and a byte budget.

Entries in use (a live request or a pin holds a reference) are never evicted; the cache may
then sit over budget until they are released. Thread-safe: the gRPC loop inserts, the engine
thread reads when it moves an adapter into a GPU slot.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loraplane.adapter_format import NormalizedAdapter


@dataclass
class _Entry:
    adapter: NormalizedAdapter
    size: int
    refs: int = 0


class CpuCache:
    def __init__(self, max_entries: int, max_bytes: int, pin_memory: bool = False):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("the CPU cache needs room for at least one adapter")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.pin_memory = pin_memory
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def get(self, key: str) -> NormalizedAdapter | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.adapter

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: str, adapter: NormalizedAdapter, hold: bool = False) -> list[str]:
        """Insert (or refresh) `key`, and with `hold` also acquire it in the same step; returns the
        keys evicted to make room."""
        if self.pin_memory:
            # Page-locked host memory makes the copy into a GPU slot asynchronous and faster.
            adapter.tensors = {k: v.pin_memory() for k, v in adapter.tensors.items()}
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.refs += hold
                return []
            entry = _Entry(adapter, adapter.size_bytes, refs=int(hold))
            self._entries[key] = entry
            self.bytes += entry.size
            return self._evict_locked(keep=key)

    def _evict_locked(self, keep: str) -> list[str]:
        evicted = []
        for key in list(self._entries):
            if len(self._entries) <= self.max_entries and self.bytes <= self.max_bytes:
                break
            entry = self._entries[key]
            if key == keep or entry.refs:
                continue
            del self._entries[key]
            self.bytes -= entry.size
            evicted.append(key)
        return evicted

    def acquire(self, key: str) -> bool:
        """Hold `key` in the tier (no eviction) until release(); False if it is not cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.refs += 1
            self._entries.move_to_end(key)
            return True

    def release(self, key: str) -> list[str]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.refs:
                entry.refs -= 1
            return self._evict_locked(keep="")

    def remove(self, key: str) -> bool:
        """Drop `key` unless it is in use; True if it is gone."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return True
            if entry.refs:
                return False
            del self._entries[key]
            self.bytes -= entry.size
            return True

    def refs(self, key: str) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return entry.refs if entry else 0

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def size_of(self, key: str) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return entry.size if entry else 0


def host_pinning_available() -> bool:
    return torch.cuda.is_available()
