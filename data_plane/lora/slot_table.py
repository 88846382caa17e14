"""GPU tier bookkeeping: which adapter key is in which slot, LRU order, and pins.

Lives in the engine thread. The engine owns the actual mapping (`Engine.adapter_slots`); this
table only decides which slot a newcomer takes: a free one, else the least recently used
adapter that is neither pinned nor used by a running request.
"""

from __future__ import annotations

from collections import OrderedDict


class SlotTable:
    def __init__(self, num_slots: int, max_pinned: int):
        if num_slots < 1:
            raise ValueError("need at least one LoRA slot")
        if not 0 <= max_pinned <= num_slots:
            raise ValueError(f"max pinned adapters must be in [0, {num_slots}]")
        self.num_slots = num_slots
        self.max_pinned = max_pinned
        self._lru: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recent first
        self.pinned: set[str] = set()

    def slot_of(self, key: str) -> int | None:
        return self._lru.get(key)

    def keys(self) -> list[str]:
        return list(self._lru)

    @property
    def free_slots(self) -> int:
        return self.num_slots - len(self._lru)

    def touch(self, key: str) -> None:
        if key in self._lru:
            self._lru.move_to_end(key)

    def choose(self, in_use: set[str]) -> tuple[int, str | None] | None:
        """(slot, adapter to evict from it or None), or None when every slot is busy or pinned."""
        taken = set(self._lru.values())
        for slot in range(self.num_slots):
            if slot not in taken:
                return slot, None
        for key, slot in self._lru.items():
            if key not in self.pinned and key not in in_use:
                return slot, key
        return None

    def placed(self, key: str, slot: int) -> None:
        for old in [k for k, s in self._lru.items() if s == slot]:
            del self._lru[old]
        self._lru[key] = slot

    def removed(self, key: str) -> None:
        self._lru.pop(key, None)

    def pin(self, key: str) -> bool:
        """Pin `key` on the GPU if the pinned budget allows; False means it stays CPU-resident only."""
        if key in self.pinned:
            return True
        if len(self.pinned) >= self.max_pinned:
            return False
        self.pinned.add(key)
        return True

    def unpin(self, key: str) -> None:
        self.pinned.discard(key)
