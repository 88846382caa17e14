"""Follow the registry: events from the Redis stream, reconciled against the records.

Each data plane keeps its own position in the stream (plain XREAD, a broadcast). Events are
hints; after a Redis outage the watcher re-reads the registry and then carries on from its
last position, so a pin or a delete that happened meanwhile is neither missed nor misapplied.
"""

from __future__ import annotations

import asyncio
import logging
import time

from control_plane.registry import Registry
from data_plane.lora.adapter_cache import AdapterCache, Lease, adapter_key
from data_plane.server.engine_loop import EngineLoop
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)
READ_BLOCK_MS = 1000
RETRY_S = 1.0
# A pin that could not take its adapter (not READY yet, control plane down) is tried again on the
# adapter's READY event, and at this interval: a fetch that fails can take a while, and events wait.
PIN_RETRY_S = 10.0


class RegistryWatcher:
    def __init__(self, registry: Registry, cache: AdapterCache, loop: EngineLoop):
        self.registry = registry
        self.cache = cache
        self.loop = loop
        self._pins: dict[str, Lease] = {}  # name -> the lease that keeps a pinned adapter CPU-resident
        self._deferred: set[str] = set()   # pinned in the registry, not held here yet
        self._retry_at = 0.0
        self.last_id = ""
        self.connected = False
        self.applied = 0

    async def run(self) -> None:
        while True:
            try:
                if not self.connected:
                    if not self.last_id:
                        self.last_id = await self.registry.last_event_id()
                    await self.reconcile()
                    self.connected = True
                for event_id, data in await self.registry.read_events(self.last_id, READ_BLOCK_MS):
                    await self.apply(data)
                    self.last_id = event_id
                    self.applied += 1
                if self._deferred and time.monotonic() >= self._retry_at:
                    self._retry_at = time.monotonic() + PIN_RETRY_S
                    for name in sorted(self._deferred):
                        await self.pin(name)
            except LoraplaneError as e:
                if e.reason == R.ERROR_REASON_REGISTRY_UNAVAILABLE:
                    if self.connected:
                        logger.warning("registry unreachable; cached adapters keep serving: %s", e.message)
                else:  # e.g. the control plane is down while a pin needs a fetch: reconcile again later
                    logger.warning("registry event handling failed, will reconcile: %s", e)
                self.connected = False
                await asyncio.sleep(RETRY_S)

    async def reconcile(self) -> None:
        """Make pins and cached versions agree with the registry as it is now."""
        pinned = set(await self.registry.pinned_names())
        for name, version in list(self.cache.versions.items()):
            try:
                record = await self.registry.get(name)
                current = record.version if record.state == "READY" else ""
            except LoraplaneError as e:
                if e.reason != R.ERROR_REASON_ADAPTER_NOT_FOUND:
                    raise
                current = ""
            if current != version:
                await self.retire(name)
        for name in (set(self._pins) | self._deferred) - pinned:
            await self.unpin(name)
        for name in pinned - set(self._pins):
            await self.pin(name)
        logger.info("reconciled with the registry: %d pinned, %d cached", len(pinned), len(self.cache.versions))

    async def apply(self, event: dict) -> None:
        kind, name, version = event.get("type"), event.get("name", ""), event.get("version", "")
        if kind == "DELETED":
            await self.unpin(name)
            await self.retire(name)
        elif kind in ("READY", "UPDATED"):
            known = self.cache.versions.get(name)
            if known and known != version:
                was_pinned = name in self._pins
                await self.unpin(name)
                await self.retire(name)
                if was_pinned:
                    await self.pin(name)
            if name in self._deferred:
                await self.pin(name)
        elif kind == "PINNED":
            await self.pin(name)
        elif kind == "UNPINNED":
            await self.unpin(name)

    async def retire(self, name: str) -> None:
        key = self.cache.retire(name)
        if key is not None:
            await self.loop.acall(lambda _e: self.loop.evict_later(key))
            logger.info("adapter %s retired: leaves the GPU once its requests finish", key)

    async def pin(self, name: str) -> None:
        if name in self._pins:
            return
        try:
            lease = await self.cache.acquire(name)
        except LoraplaneError as e:
            # Not READY yet (registered with --pin), or the control plane is down: its READY event,
            # or the next retry, pins it. A DELETED event or a reconcile drops it.
            if name not in self._deferred:
                logger.info("pin of %s deferred: %s", name, e.message)
            self._deferred.add(name)
            return
        self._deferred.discard(name)
        self._pins[name] = lease
        self.cache.pinned.add(name)
        on_gpu = await self.loop.acall(lambda _e: self._place(lease.key))
        logger.info("adapter %s pinned (%s)", lease.key, "GPU and CPU" if on_gpu else "CPU; GPU pin budget full")

    def _place(self, key: str) -> bool:
        """On the engine thread: hold `key` in a GPU slot, if the pin budget allows."""
        if not self.loop.slots.pin(key):
            return False
        return self.loop.promote(key)

    async def unpin(self, name: str) -> None:
        self._deferred.discard(name)
        lease = self._pins.pop(name, None)
        self.cache.pinned.discard(name)
        if lease is None:
            return
        waiting = [other.key for other in self._pins.values()]

        def release(_engine) -> list[str]:
            self.loop.slots.unpin(lease.key)
            # The freed budget goes to a pin that found it full: pinned in the CPU tier only, till now.
            return [key for key in waiting if key not in self.loop.slots.pinned and self._place(key)]

        upgraded = await self.loop.acall(release)
        self.cache.release(lease)
        logger.info("adapter %s unpinned%s", adapter_key(lease.name, lease.version),
                    f"; {', '.join(upgraded)} now pinned on the GPU" if upgraded else "")
