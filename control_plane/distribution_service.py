"""AdapterDistributionService: data planes resolve names and stream READY artifacts."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from control_plane.artifact_store import CHUNK_SIZE, ArtifactStore
from control_plane.registry import AdapterRecord, Registry
from loraplane.errors import LoraplaneError, abort, invalid_argument
from loraplane.names import parse_reference, validate_name
from loraplane.v1 import adapter_pb2, distribution_service_pb2, distribution_service_pb2_grpc
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)


RESOLVE_CACHE_S = 1.0


class DistributionServicer(distribution_service_pb2_grpc.AdapterDistributionServiceServicer):
    def __init__(self, registry: Registry, store: ArtifactStore, resolve_cache_s: float = RESOLVE_CACHE_S):
        self.registry = registry
        self.store = store
        # Resolve is the hot call (every data-plane miss, every replica); answering it from a
        # short-lived copy of the READY record saves a Redis round trip. A manifest may lag a
        # registry change by resolve_cache_s; Fetch always re-checks Redis, so no stale bytes are served.
        self.resolve_cache_s = resolve_cache_s
        self._manifests: dict[str, tuple[float, adapter_pb2.AdapterManifest]] = {}

    def invalidate(self, name: str) -> None:
        """Forget the cached manifest of `name` (called on every registry change to it)."""
        self._manifests.pop(name, None)

    async def follow_events(self) -> None:
        """Invalidate on changes made through any replica; the TTL bounds staleness if this lags."""
        after = None
        while True:
            try:
                if after is None:
                    after = await self.registry.last_event_id()
                for event_id, data in await self.registry.read_events(after, 1000):
                    after = event_id
                    self.invalidate(data.get("name", ""))
            except LoraplaneError as e:
                # Events may have been missed: forget every manifest rather than serve one stale.
                logger.warning("resolve cache: cannot follow registry events (%s); retrying in 1 s", e)
                self._manifests.clear()
                await asyncio.sleep(1.0)

    async def _ready(self, name: str, version: str) -> AdapterRecord:
        """The record, only if READY, at `version` when given, with its artifact on disk."""
        record = await self.registry.get(name)
        if record.state != "READY":
            raise LoraplaneError(R.ERROR_REASON_ADAPTER_NOT_READY,
                                 f"adapter {name!r} is {record.state}, not READY", {"name": name, "state": record.state})
        if version and version != record.version:
            raise LoraplaneError(R.ERROR_REASON_ADAPTER_NOT_FOUND,
                                 f"adapter {name!r} has no version {version}", {"name": name})
        if not self.store.exists(record.version):
            raise LoraplaneError(R.ERROR_REASON_ADAPTER_NOT_READY,
                                 f"artifact of {name!r} is not in this replica's store (is the store shared?)",
                                 {"name": name})
        return record

    async def ResolveAdapter(self, request, context):
        try:
            name, version = parse_reference(request.name)
            cached = self._manifests.get(name)
            now = time.monotonic()
            if cached and cached[0] > now and (not version or version == cached[1].version):
                return distribution_service_pb2.ResolveAdapterResponse(manifest=cached[1])
            r = await self._ready(name, version)
            manifest = adapter_pb2.AdapterManifest(
                name=r.name, version=r.version, size_bytes=r.size_bytes, rank=r.rank,
                target_modules=list(r.target_modules), dtype=r.dtype, base_model=r.base_model, pinned=r.pinned)
            if self.resolve_cache_s > 0:
                if len(self._manifests) > 10_000:
                    self._manifests.clear()
                self._manifests[name] = (now + self.resolve_cache_s, manifest)
            return distribution_service_pb2.ResolveAdapterResponse(manifest=manifest)
        except LoraplaneError as e:
            await abort(context, e)

    async def FetchAdapter(self, request, context):
        try:
            name = validate_name(request.name)
            if not request.version:
                raise invalid_argument("version", "version is required; get it from ResolveAdapter")
            _, version = parse_reference(f"{name}@{request.version}", "version")
            await self._ready(name, version)
            try:
                total = self.store.size(version)
                f = await asyncio.to_thread(open, self.store.path(version), "rb")
            except FileNotFoundError:
                # Deleted between the check above and here; the path is the server's business.
                raise LoraplaneError(R.ERROR_REASON_ADAPTER_NOT_READY,
                                     f"adapter {name!r} at {version} was deleted meanwhile", {"name": name}) from None
            # Hash everything we serve, the skipped prefix included, so the digest on the last
            # message proves the bytes on disk are still the registered version.
            hasher = hashlib.sha256()
            try:
                if not 0 <= request.offset <= total:
                    raise invalid_argument("offset", f"offset must be in [0, {total}]")
                prefix = request.offset
                while prefix:
                    block = await asyncio.to_thread(f.read, min(prefix, CHUNK_SIZE * 8))
                    hasher.update(block)
                    prefix -= len(block)
                offset = request.offset
                while chunk := await asyncio.to_thread(f.read, CHUNK_SIZE):
                    hasher.update(chunk)
                    yield distribution_service_pb2.FetchAdapterResponse(offset=offset, data=chunk, total_size=total)
                    offset += len(chunk)
            finally:
                f.close()
            served = "sha256:" + hasher.hexdigest()
            if served != version:
                logger.error("artifact %s on disk hashes to %s: corrupted", version, served)
                raise LoraplaneError(R.ERROR_REASON_DIGEST_MISMATCH, f"stored artifact for {name!r} is corrupted")
            yield distribution_service_pb2.FetchAdapterResponse(offset=offset, total_size=total, digest=served)
        except LoraplaneError as e:
            await abort(context, e)
