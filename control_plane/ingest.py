"""Download -> validate -> normalize -> store, for one adapter at a time per lease.

Each step is an atomic registry transition guarded by this replica's lease, so a job whose record
was deleted, replaced or taken over by another replica stops without touching it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from control_plane.artifact_store import ArtifactStore
from control_plane.registry import ACTIVE_STATES, AdapterRecord, Registry
from control_plane.sources import SourceConfig, SourceSpec, fetch_source, parse_source
from loraplane.adapter_format import normalize_peft_dir
from loraplane.errors import LoraplaneError
from loraplane.model_spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestSettings:
    spec: ModelSpec
    sources: SourceConfig
    max_rank: int
    max_bytes: int
    dtype: str
    owner: str
    lease_ms: int = 30_000
    concurrency: int = 4


class Ingestor:
    def __init__(self, registry: Registry, store: ArtifactStore, settings: IngestSettings):
        self.registry = registry
        self.store = store
        self.settings = settings
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._tasks: dict[str, asyncio.Task] = {}
        # Set when the service stops: the orphan sweep starts nothing more (the leases of what it
        # leaves expire, and another replica or the next start takes those jobs over).
        self.closing = False

    def new_owner(self) -> str:
        """A lease owner for one job. Per job, not per replica: a job left over from a deleted
        record must not pass the lease check on a newer record of the same name."""
        return f"{self.settings.owner}/{secrets.token_hex(6)}"

    def start(self, name: str, source: SourceSpec, owner: str) -> asyncio.Task:
        task = asyncio.create_task(self.run(name, source, owner), name=f"ingest:{name}")
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._tasks.pop(name, None) if self._tasks.get(name) is t else None)
        return task

    async def run(self, name: str, source: SourceSpec, owner: str) -> LoraplaneError | None:
        """Ingest `name` as lease `owner`; returns the error it failed with (already recorded as FAILED), or None."""
        # Renewed from the start: a job queued behind --max-concurrent-ingests would otherwise let its
        # lease lapse while it waits, and another replica's sweep take it over.
        renew = asyncio.create_task(self._renew(name, owner))
        try:
            async with self._sem:
                return await self._ingest(name, source, owner)
        finally:
            renew.cancel()

    async def _ingest(self, name: str, source: SourceSpec, owner: str) -> LoraplaneError | None:
        try:
            if not await self.registry.transition(name, ACTIVE_STATES, "DOWNLOADING", owner=owner):
                return None
            logger.info("adapter %s: downloading %s", name, source.uri())
            with tempfile.TemporaryDirectory(dir=self.store.tmp) as tmp:
                fetched = await asyncio.to_thread(fetch_source, source, self.settings.sources, Path(tmp))
                if not await self.registry.transition(name, ("DOWNLOADING",), "VALIDATING", owner=owner,
                                                      resolved_revision=fetched.resolved_revision):
                    return None
                version, adapter = await asyncio.to_thread(self._normalize_and_store, fetched.path)
            await self._mark_ready(name, version, adapter, owner)
            return None
        except LoraplaneError as e:
            logger.warning("adapter %s failed: %s", name, e)
            await self._mark_failed(name, e.reason_name, e.message, owner)
            return e
        except Exception as e:  # a bug, not bad input: keep the trace in our log, not the client's
            logger.exception("adapter %s: unexpected error while ingesting", name)
            await self._mark_failed(name, "UNSPECIFIED", f"internal error ({type(e).__name__}); see control-plane log",
                                    owner)
            return LoraplaneError(0, f"internal error while ingesting {name!r}", code=grpc.StatusCode.INTERNAL)

    def _normalize_and_store(self, path: Path):
        s = self.settings
        adapter = normalize_peft_dir(path, s.spec, s.max_rank, s.max_bytes, s.dtype)
        return self.store.put(adapter.to_bytes()), adapter

    async def _mark_ready(self, name: str, version: str, adapter, owner: str) -> None:
        # The ref is taken before READY so a delete right after READY always sees it.
        await self.registry.add_artifact_ref(version, name)
        try:
            size = self.store.size(version)
        except FileNotFoundError:  # a delete of the same content, before our ref, removed it
            await asyncio.to_thread(self.store.put, adapter.to_bytes())
            size = self.store.size(version)
        ok = await self.registry.transition(
            name, ("VALIDATING",), "READY", event="READY", owner=owner, version=version,
            rank=adapter.rank, target_modules=adapter.target_modules, size_bytes=size,
            dtype=adapter.dtype, alpha=adapter.source_config.lora_alpha, use_rslora=adapter.source_config.use_rslora,
            failure_message="", failure_reason="")
        if not ok:
            await self.registry.drop_artifact_ref(version, name)
            await self.drop_if_unused(version)
            return
        # Refs hold names: a job for an older record of this name may have dropped "our" ref
        # between our add and READY. Taking it again (while still READY) closes that gap.
        await self.registry.keep_artifact_ref(version, name)
        if not self.store.exists(version):  # a concurrent delete of the same content removed the files
            await asyncio.to_thread(self.store.put, adapter.to_bytes())
        logger.info("adapter %s READY as %s (rank %d, %s)", name, version, adapter.rank,
                    ",".join(adapter.target_modules))

    async def _mark_failed(self, name: str, reason: str, message: str, owner: str) -> None:
        try:
            await self.registry.transition(name, ACTIVE_STATES, "FAILED", event="FAILED", owner=owner,
                                           failure_reason=reason, failure_message=message[:2000])
        except LoraplaneError as e:  # Redis down: the lease expires and a sweep retries the job
            logger.warning("adapter %s: could not record failure: %s", name, e)

    async def drop_if_unused(self, version: str) -> None:
        """Delete the artifact unless an adapter references it. It is moved aside first and the refs
        read again: an ingest of the same bytes that took its ref in between keeps the files."""
        if not version or await self.registry.artifact_refs(version) != 0:
            return
        aside = await asyncio.to_thread(self.store.move_aside, version)
        if aside is None:
            return
        try:
            unused = await self.registry.artifact_refs(version) == 0
        except LoraplaneError:
            unused = False  # cannot tell: keep it (an orphan is harmless, a missing artifact is not)
        if unused:
            await asyncio.to_thread(self.store.drop_aside, version, aside)
        else:
            await asyncio.to_thread(self.store.move_back, version, aside)

    async def _renew(self, name: str, owner: str) -> None:
        interval = self.settings.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(LoraplaneError):
                # Only our own lease: a job whose lease lapsed must not take a newer job's.
                await self.registry.claim(name, owner, self.settings.lease_ms, renew=True)

    async def resume_orphans(self) -> int:
        """Take over jobs whose replica stopped renewing its lease; returns how many were restarted."""
        started = 0
        for state in ACTIVE_STATES:
            for name in await self.registry.names_in(state):
                if self.closing:
                    return started
                if name in self._tasks:
                    continue
                owner = self.new_owner()
                if await self.registry.claim(name, owner, self.settings.lease_ms):
                    record: AdapterRecord = await self.registry.get(name)
                    logger.info("adapter %s: resuming orphaned ingest (%s)", name, record.state)
                    self.start(name, parse_source(record.source, record.revision), owner)
                    started += 1
        return started

    async def close(self) -> None:
        self.closing = True
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
