"""AdapterCacheService: what each tier holds, prefetch ahead of traffic, evict."""

from __future__ import annotations

from collections.abc import Callable

from data_plane.lora.adapter_cache import AdapterCache
from data_plane.server.engine_loop import EngineLoop
from loraplane.errors import LoraplaneError, abort, invalid_argument
from loraplane.names import validate_name
from loraplane.v1 import cache_service_pb2 as cache_pb2
from loraplane.v1 import cache_service_pb2_grpc as cache_grpc
from loraplane.v1 import errors_pb2 as R

GPU, CPU, DISK = cache_pb2.CACHE_TIER_GPU, cache_pb2.CACHE_TIER_CPU, cache_pb2.CACHE_TIER_DISK


class CacheServicer(cache_grpc.AdapterCacheServiceServicer):
    def __init__(self, loop: EngineLoop, cache: AdapterCache, draining: Callable[[], bool]):
        self.loop = loop
        self.cache = cache
        self.draining = draining  # whether the replica is draining (GenerationServicer.draining)

    def _entry(self, key: str, name: str, slot: int | None) -> cache_pb2.CachedAdapter:
        version = key.split("@", 1)[1]
        tiers = [t for t, present in ((GPU, slot is not None), (CPU, key in self.cache.cpu),
                                      (DISK, version in self.cache.disk)) if present]
        pinned = name in self.cache.pinned
        # A pin holds the current version's CPU entry like a request does; it is not a request.
        pin_hold = 1 if pinned and self.cache.versions.get(name) == version else 0
        return cache_pb2.CachedAdapter(
            name=name, version=version, tiers=tiers, slot=-1 if slot is None else slot,
            pinned=pinned, size_bytes=self.cache.cpu.size_of(key),
            active_requests=max(0, self.cache.cpu.refs(key) - pin_hold))

    def _entries(self) -> list[cache_pb2.CachedAdapter]:
        gpu = set(self.loop.stats.gpu_adapters)
        keys = {**self.cache.cached_keys(), **{k: k.split("@", 1)[0] for k in gpu}}
        return [self._entry(key, name, self.loop.slots.slot_of(key) if key in gpu else None)
                for key, name in sorted(keys.items())]

    async def ListCachedAdapters(self, request, context):
        return cache_pb2.ListCachedAdaptersResponse(adapters=self._entries(), free_slots=self.loop.stats.free_slots)

    def _place(self, key: str, on_gpu: bool) -> int | None:
        """Engine thread: promote `key` when asked; its slot, read where it is current (the published
        stats may predate the promotion)."""
        if on_gpu and not self.loop.promote(key):
            raise LoraplaneError(R.ERROR_REASON_CAPACITY_EXHAUSTED,
                                 "every GPU slot is pinned or in use; try again later")
        return self.loop.slots.slot_of(key)

    async def PrefetchAdapter(self, request, context):
        try:
            if self.draining():  # it would start fetches on a replica about to exit
                raise LoraplaneError(R.ERROR_REASON_SERVER_NOT_READY, "this replica is draining; prefetch on another")
            name = validate_name(request.name)
            if request.tier not in (cache_pb2.CACHE_TIER_UNSPECIFIED, GPU, CPU, DISK):
                raise invalid_argument("tier", f"unknown tier {request.tier}")
            tier = request.tier or CPU
            if tier == DISK:  # the download only: nothing parsed, nothing in the CPU tier
                lease = await self.cache.download(name)
                slot = await self.loop.acall(lambda _e: self.loop.slots.slot_of(lease.key))
                return cache_pb2.PrefetchAdapterResponse(adapter=self._entry(lease.key, lease.name, slot))
            lease = await self.cache.acquire(name)
            try:
                slot = await self.loop.acall(lambda _e: self._place(lease.key, tier == GPU))
            finally:
                self.cache.release(lease)
            # Read after the release, which may evict it again: the CPU tier can be full of pinned
            # or in-use adapters, and nothing else holds this one.
            entry = self._entry(lease.key, lease.name, slot)
            if not any(t <= tier for t in entry.tiers):  # not in the tier asked for, nor a faster one
                raise LoraplaneError(R.ERROR_REASON_CAPACITY_EXHAUSTED,
                                     f"adapter {name!r} was loaded but the {cache_pb2.CacheTier.Name(tier)} "
                                     "tier is full of pinned or in-use adapters; try again later",
                                     {"name": name})
            return cache_pb2.PrefetchAdapterResponse(adapter=entry)
        except LoraplaneError as e:
            await abort(context, e)

    async def EvictAdapter(self, request, context):
        try:
            name = validate_name(request.name)
            if request.tier not in (cache_pb2.CACHE_TIER_UNSPECIFIED, GPU, CPU, DISK):
                raise invalid_argument("tier", f"unknown tier {request.tier}")
            keys = [k for k in {*self.cache.cached_keys(), *self.loop.stats.gpu_adapters}
                    if k.split("@", 1)[0] == name]
            if not keys:
                raise LoraplaneError(R.ERROR_REASON_ADAPTER_NOT_FOUND, f"adapter {name!r} is not cached here",
                                     {"name": name})
            if name in self.cache.pinned:
                # The pin would put it straight back (or hold it forever): the registry decides.
                raise LoraplaneError(R.ERROR_REASON_ADAPTER_PINNED,
                                     f"adapter {name!r} is pinned; unpin it in the registry first", {"name": name})
            tier = request.tier or DISK
            for key in keys:
                # GPU always, CPU and disk too when asked: a slower tier never holds less than a faster one.
                await self.loop.acall(lambda _e, k=key: self.loop.evict_later(k))
                if tier in (CPU, DISK):
                    self.cache.evict_cpu(key)
                if tier == DISK:
                    self.cache.disk.remove(key.split("@", 1)[1])
            return cache_pb2.EvictAdapterResponse()
        except LoraplaneError as e:
            await abort(context, e)
