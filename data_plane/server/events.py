"""Follow the registry: events from the Redis stream, reconciled against the records.

Each data plane keeps its own position in the stream (plain XREAD, a broadcast). Events are
hints; after a Redis outage the watcher re-reads the registry and then carries on from its
last position, so a pin or a delete that happened meanwhile is neither missed nor misapplied.
"""

from __future__ import annotations

import asyncio
import logging

from control_plane.registry import Registry
from data_plane.lora.adapter_cache import AdapterCache, Lease, adapter_key
from data_plane.server.engine_loop import EngineLoop
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)
READ_BLOCK_MS = 1000
RETRY_S = 1.0


class RegistryWatcher:
    def __init__(self, registry: Registry, cache: AdapterCache, loop: EngineLoop):
        self.registry = registry
        self.cache = cache
        self.loop = loop
        self._pins: dict[str, Lease] = {}  # name -> the lease that keeps a pinned adapter CPU-resident
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
        for name in set(self._pins) - pinned:
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
        except LoraplaneError as e:  # not READY yet, or gone again: its READY event pins it later
            logger.info("pin of %s deferred: %s", name, e.message)
            return
        self._pins[name] = lease
        self.cache.pinned.add(name)

        def place(_engine) -> bool:
            if not self.loop.slots.pin(lease.key):
                return False
            return self.loop.promote(lease.key)

        on_gpu = await self.loop.acall(place)
        logger.info("adapter %s pinned (%s)", lease.key, "GPU and CPU" if on_gpu else "CPU; GPU pin budget full")

    async def unpin(self, name: str) -> None:
        lease = self._pins.pop(name, None)
        self.cache.pinned.discard(name)
        if lease is None:
            return
        await self.loop.acall(lambda _e: self.loop.slots.unpin(lease.key))
        self.cache.release(lease)
        logger.info("adapter %s unpinned", adapter_key(lease.name, lease.version))
