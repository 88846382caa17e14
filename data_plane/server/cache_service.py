"""AdapterCacheService: what each tier holds, prefetch ahead of traffic, evict."""

from __future__ import annotations

from data_plane.lora.adapter_cache import AdapterCache, adapter_key
from data_plane.server.engine_loop import EngineLoop
from loraplane.errors import LoraplaneError, abort, invalid_argument
from loraplane.names import validate_name
from loraplane.v1 import cache_service_pb2 as cache_pb2
from loraplane.v1 import cache_service_pb2_grpc as cache_grpc
from loraplane.v1 import errors_pb2 as R

GPU, CPU, DISK = cache_pb2.CACHE_TIER_GPU, cache_pb2.CACHE_TIER_CPU, cache_pb2.CACHE_TIER_DISK


class CacheServicer(cache_grpc.AdapterCacheServiceServicer):
    def __init__(self, loop: EngineLoop, cache: AdapterCache):
        self.loop = loop
        self.cache = cache

    def _entries(self) -> list[cache_pb2.CachedAdapter]:
        stats = self.loop.stats
        gpu = set(stats.gpu_adapters)
        running = {}
        for key in stats.running_adapters:
            running[key] = running.get(key, 0) + 1
        keys = {**self.cache.cached_keys(), **{k: k.split("@", 1)[0] for k in gpu}}
        entries = []
        for key, name in sorted(keys.items()):
            version = key.split("@", 1)[1]
            tiers = [t for t, present in ((GPU, key in gpu), (CPU, key in self.cache.cpu),
                                          (DISK, version in self.cache.disk)) if present]
            entries.append(cache_pb2.CachedAdapter(
                name=name, version=version, tiers=tiers, slot=self.loop.slots.slot_of(key) if key in gpu else -1,
                pinned=name in self.cache.pinned, size_bytes=self.cache.cpu.size_of(key),
                active_requests=self.cache.cpu.refs(key)))
        return entries

    async def ListCachedAdapters(self, request, context):
        return cache_pb2.ListCachedAdaptersResponse(adapters=self._entries(), free_slots=self.loop.stats.free_slots)

    async def PrefetchAdapter(self, request, context):
        try:
            name = validate_name(request.name)
            if request.tier not in (cache_pb2.CACHE_TIER_UNSPECIFIED, GPU, CPU, DISK):
                raise invalid_argument("tier", f"unknown tier {request.tier}")
            lease = await self.cache.acquire(name)
            try:
                if request.tier == GPU and not await self.loop.acall(lambda _e: self.loop.promote(lease.key)):
                    raise LoraplaneError(R.ERROR_REASON_CAPACITY_EXHAUSTED,
                                         "every GPU slot is pinned or in use; try again later")
            finally:
                self.cache.release(lease)
            entry = next(e for e in self._entries() if adapter_key(e.name, e.version) == lease.key)
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
            tier = request.tier or DISK
            for key in keys:
                # GPU always, CPU and disk too when asked: a slower tier never holds less than a faster one.
                await self.loop.acall(lambda _e, k=key: self.loop.evict_later(k))
                if tier in (CPU, DISK):
                    self.cache.cpu.remove(key)
                if tier == DISK:
                    self.cache.disk.remove(key.split("@", 1)[1])
            return cache_pb2.EvictAdapterResponse()
        except LoraplaneError as e:
            await abort(context, e)
