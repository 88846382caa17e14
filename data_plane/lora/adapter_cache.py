"""The three adapter tiers behind one door: GPU slots <- CPU LRU <- local disk <- control plane.

`acquire(ref)` makes an adapter CPU-resident and holds it there for one request; the engine
thread moves it into a GPU slot when the request is scheduled. A miss at every tier resolves
the adapter with the control plane and streams it; concurrent misses share one fetch. The
engine addresses adapters by key "name@version", so an updated adapter never mixes with the
old version still serving in-flight requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from data_plane.lora.cpu_cache import CpuCache
from data_plane.lora.disk_cache import DiskCache
from data_plane.lora.fetcher import Fetcher
from loraplane.adapter_format import NormalizedAdapter
from loraplane.errors import LoraplaneError
from loraplane.names import parse_reference
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)


def adapter_key(name: str, version: str) -> str:
    return f"{name}@{version}"


@dataclass(frozen=True)
class Lease:
    name: str
    version: str
    key: str


class AdapterCache:
    def __init__(self, fetcher: Fetcher, cpu: CpuCache, disk: DiskCache, metrics=None,
                 check: Callable[[NormalizedAdapter], None] | None = None):
        self.fetcher = fetcher
        self.cpu = cpu
        self.disk = disk
        self.metrics = metrics
        # Raises for an adapter no GPU slot can hold (Engine.check_adapter): such an adapter fails
        # its requests when it is loaded, instead of queueing them for a slot it can never take.
        self.check = check
        self.versions: dict[str, str] = {}      # name -> version this replica serves for it
        self.pinned: set[str] = set()            # names pinned in the registry
        self._inflight: dict[str, asyncio.Task] = {}
        self._retired: set[str] = set()          # replaced keys still held: dropped at their last release
        # name -> acquires and downloads under way, and how often the registry retired the name
        # meanwhile: what a retire overtook (deleted or replaced while its bytes were on the way)
        # never becomes the name's version and leaves the tiers as a retired version does.
        self._in_flight: dict[str, int] = {}
        self._retirements: dict[str, int] = {}

    def _hit(self, tier: str, hit: bool) -> None:
        if self.metrics:
            self.metrics.cache_lookup(tier, hit)

    async def _version(self, ref: str) -> tuple[str, str, bool]:
        """(name, version, whether the control plane was asked) for "name" or "name@version"."""
        name, version = parse_reference(ref, "adapter")
        if version:
            return name, version, False
        version = self.versions.get(name) or ""
        if version and (adapter_key(name, version) in self.cpu or version in self.disk):
            return name, version, False
        # Unknown here, or known but no longer cached: ask the control plane what is current.
        return name, (await self.fetcher.resolve(name)).version, True

    async def download(self, ref: str) -> Lease:
        """Put `ref` in the disk tier only (PrefetchAdapter tier=DISK); nothing is held afterwards."""
        name = parse_reference(ref, "adapter")[0]
        retirements = self._begin(name)
        try:
            name, version, resolved = await self._version(ref)
            if version not in self.disk:
                if not self.disk.enabled:
                    raise LoraplaneError(R.ERROR_REASON_CAPACITY_EXHAUSTED,
                                         "the disk tier is off on this replica (--disk-cache-bytes 0)",
                                         {"name": name})
                data = await self.fetcher.fetch(name, version)
                try:
                    await self._put_on_disk(version, data)
                except OSError as e:
                    raise LoraplaneError(R.ERROR_REASON_CAPACITY_EXHAUSTED,
                                         f"the disk tier could not store {name!r}: {e.strerror}",
                                         {"name": name}) from None
            self._settle(name, version, resolved, retirements)
        finally:
            self._end(name)
        return Lease(name, version, adapter_key(name, version))

    async def acquire(self, ref: str) -> Lease:
        """Hold `ref` ("name" or "name@version") in the CPU tier for one request."""
        name = parse_reference(ref, "adapter")[0]
        retirements = self._begin(name)
        try:
            name, version, resolved = await self._version(ref)
            key = adapter_key(name, version)
            # One lookup per request: a hit if the CPU tier had it, one miss however long the load
            # takes (a request waiting on another's in-flight load is one miss, not one per retry).
            hit = self.cpu.acquire(key)
            self._hit("cpu", hit)
            if not hit:
                adapter = await self._load(name, version, key)
                # While this request waited, a release may have evicted it again (the tier runs over
                # budget while other entries are held): put it back and hold it in one step. Looping
                # on acquire-then-load instead once spun without yielding (a finished load still
                # listed as in flight), and the event loop froze with every stream on it.
                for evicted in self.cpu.put(key, adapter, hold=True):
                    self._evicted("cpu", evicted)
            self._settle(name, version, resolved, retirements)
        finally:
            self._end(name)
        return Lease(name, version, key)

    def _begin(self, name: str) -> int:
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        return self._retirements.get(name, 0)

    def _end(self, name: str) -> None:
        left = self._in_flight.pop(name) - 1
        if left:
            self._in_flight[name] = left
        else:
            self._retirements.pop(name, None)

    def _settle(self, name: str, version: str, resolved: bool, retirements: int) -> None:
        """After a load: make `version` what plain `name` means here, if the control plane said so
        just now (a name@version ref may name an old version, which plain-name requests must never
        be sent to). If the registry retired the name meanwhile, the version is treated as retired
        instead: this request still runs on it, then it leaves the CPU tier, and the disk now."""
        key = adapter_key(name, version)
        if self._retirements.get(name, 0) != retirements:
            logger.info("adapter %s was retired while %s loaded; it is dropped after this request", name, key)
            if key in self.cpu:
                self.evict_cpu(key)
            if version not in self.versions.values():
                self.disk.remove(version)
            return
        if resolved:
            self.versions[name] = version
            # Deleted and registered again with the same weights: current again, so it stays cached.
            self._retired.discard(key)

    def release(self, lease: Lease) -> None:
        for key in self.cpu.release(lease.key):
            self._evicted("cpu", key)
        if lease.key in self._retired and self.cpu.remove(lease.key):  # its last request ended
            self._retired.discard(lease.key)

    async def _load(self, name: str, version: str, key: str) -> NormalizedAdapter:
        """The adapter, loaded into the CPU tier once however many requests wait for it."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._load_once(name, version, key))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _load_once(self, name: str, version: str, key: str) -> NormalizedAdapter:
        t0 = time.perf_counter()
        data = await asyncio.to_thread(self.disk.get, version) if version in self.disk else None
        self._hit("disk", data is not None)
        source = "disk"
        if data is None:
            data = await self.fetcher.fetch(name, version)
            source = "control_plane"
            try:
                await self._put_on_disk(version, data)
            except OSError as e:
                # The disk tier is a cache: a full or failing volume costs a later cold start a
                # fetch, not this request its adapter (the bytes are verified and in memory).
                logger.warning("adapter %s not written to the disk tier, serving it from memory: %s", key, e)
        adapter = await asyncio.to_thread(self._parse, data)
        for evicted in self.cpu.put(key, adapter):
            self._evicted("cpu", evicted)
        if self.metrics:
            self.metrics.adapter_loaded(source, time.perf_counter() - t0)
        logger.info("adapter %s loaded into the CPU tier from %s in %.0f ms", key, source,
                    (time.perf_counter() - t0) * 1e3)
        return adapter

    async def _put_on_disk(self, version: str, data: bytes) -> None:
        """Write to the disk tier (OSError when the volume refuses), counting what it evicted."""
        for v in await asyncio.to_thread(self.disk.put, version, data):
            self._evicted("disk", v)

    def _parse(self, data: bytes) -> NormalizedAdapter:
        adapter = NormalizedAdapter.from_bytes(data)
        if self.check is not None:
            self.check(adapter)
        return adapter

    def _evicted(self, tier: str, what: str) -> None:
        if self.metrics:
            self.metrics.evicted(tier)
        logger.debug("evicted %s from the %s tier", what, tier)

    def retire(self, name: str) -> str | None:
        """The registry deleted or replaced `name`: forget its version; returns the retired key."""
        if name in self._in_flight:
            self._retirements[name] = self._retirements.get(name, 0) + 1
        version = self.versions.pop(name, None)
        if version is None:
            return None
        key = adapter_key(name, version)
        if not self.evict_cpu(key):
            logger.info("adapter %s retired; it leaves the CPU tier when its requests finish", key)
        if version not in self.versions.values():  # the disk tier is by digest: another name may share it
            self.disk.remove(version)
        return key

    def evict_cpu(self, key: str) -> bool:
        """Drop `key` from the CPU tier now (True), or when its last request releases it (False)."""
        if self.cpu.remove(key):
            return True
        self._retired.add(key)
        return False

    def cached_keys(self) -> dict[str, str]:
        """key -> name for everything in the CPU tier or known on disk."""
        keys = {k: k.split("@", 1)[0] for k in self.cpu.keys()}
        for name, version in self.versions.items():
            if version in self.disk:
                keys.setdefault(adapter_key(name, version), name)
        return keys
