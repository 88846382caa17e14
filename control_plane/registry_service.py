"""AdapterRegistryService: the admin API over the registry."""

from __future__ import annotations

import asyncio
import logging
import time

from google.protobuf.timestamp_pb2 import Timestamp

from control_plane.ingest import Ingestor
from control_plane.registry import (
    ACTIVE_STATES,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    STATES,
    AdapterRecord,
    Registry,
)
from control_plane.sources import SourceConfig, check_source_allowed, parse_source
from loraplane.errors import LoraplaneError, abort, invalid_argument, reason_value
from loraplane.names import validate_name
from loraplane.v1 import adapter_pb2, registry_service_pb2, registry_service_pb2_grpc
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)
WATCH_BLOCK_MS = 1000


def _ts(us: int) -> Timestamp:
    return Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def adapter_to_proto(r: AdapterRecord) -> adapter_pb2.Adapter:
    try:
        failure = reason_value(r.failure_reason) if r.failure_reason else 0
    except ValueError:
        failure = 0
    return adapter_pb2.Adapter(
        name=r.name, version=r.version, state=adapter_pb2.AdapterState.Value(f"ADAPTER_STATE_{r.state}"),
        failure_message=r.failure_message, failure_reason=failure, source=r.source, revision=r.revision,
        resolved_revision=r.resolved_revision, rank=r.rank, alpha=r.alpha, target_modules=list(r.target_modules),
        size_bytes=r.size_bytes, pinned=r.pinned, create_time=_ts(r.create_time), update_time=_ts(r.update_time),
        etag=r.etag, base_model=r.base_model, use_rslora=r.use_rslora, dtype=r.dtype)


def event_to_proto(event_id: str, data: dict) -> adapter_pb2.AdapterEvent:
    return adapter_pb2.AdapterEvent(
        event_id=event_id, type=adapter_pb2.AdapterEventType.Value(f"ADAPTER_EVENT_TYPE_{data['type']}"),
        name=data.get("name", ""), version=data.get("version", ""), time=_ts(int(data.get("time", 0))))


class RegistryServicer(registry_service_pb2_grpc.AdapterRegistryServiceServicer):
    def __init__(self, registry: Registry, ingestor: Ingestor, sources: SourceConfig, base_model_names: set[str],
                 on_change=lambda name: None):
        self.registry = registry
        self.on_change = on_change  # told the name of every adapter this replica changes
        self.ingestor = ingestor
        self.sources = sources
        self.base_model_names = base_model_names

    async def CreateAdapter(self, request, context):
        try:
            name = validate_name(request.name)
            source = parse_source(request.source, request.revision)
            check_source_allowed(source, self.sources)
            if request.base_model and request.base_model not in self.base_model_names:
                raise LoraplaneError(R.ERROR_REASON_ADAPTER_INCOMPATIBLE,
                                     f"this control plane serves base model {sorted(self.base_model_names)[0]!r}, "
                                     f"not {request.base_model!r}", {"field": "base_model"})
            owner = self.ingestor.new_owner()
            await self.registry.create(name, request.pinned, {
                "source": source.uri(), "revision": source.revision, "base_model": sorted(self.base_model_names)[0],
                # The lease starts live: at 0, any replica's orphan sweep running between this create
                # and the job's first renewal took the job over, and a waiting caller got the record
                # back mid-ingest.
                "lease_owner": owner, "lease_until": time.time_ns() // 1_000_000 + self.ingestor.settings.lease_ms})
            logger.info("adapter %s registered from %s", name, source.uri())
            task = self.ingestor.start(name, source, owner)
            if request.wait:
                error = await asyncio.shield(task)
                if error is not None:
                    # With wait the caller gets the failure itself, so no FAILED record is left behind.
                    await self._forget(name)
                    raise error
            record = await self.registry.get(name)
            while request.wait and record.state in ACTIVE_STATES:
                # Another replica's job took over (this one stalled past its lease): wait for it.
                await asyncio.sleep(0.1)
                record = await self.registry.get(name)
            return registry_service_pb2.CreateAdapterResponse(adapter=adapter_to_proto(record))
        except LoraplaneError as e:
            await abort(context, e)

    async def _forget(self, name: str) -> None:
        # By etag: another admin may register the name again between the read and the delete (a
        # FAILED record can be replaced), and that registration must survive this cleanup.
        try:
            record = await self.registry.get(name)
            if record.state == "FAILED":
                if record.pinned:
                    record = await self.registry.set_pinned(name, False, record.etag)
                await self.registry.delete(name, record.etag)
        except LoraplaneError as e:
            if e.reason in (R.ERROR_REASON_ETAG_MISMATCH, R.ERROR_REASON_ADAPTER_NOT_FOUND):
                logger.info("failed adapter %s changed meanwhile (registered again?); left as it is", name)
            else:
                logger.warning("could not remove failed adapter %s: %s", name, e)

    async def GetAdapter(self, request, context):
        try:
            record = await self.registry.get(validate_name(request.name))
            return registry_service_pb2.GetAdapterResponse(adapter=adapter_to_proto(record))
        except LoraplaneError as e:
            await abort(context, e)

    async def ListAdapters(self, request, context):
        try:
            if not 0 <= request.page_size <= MAX_PAGE_SIZE:
                raise invalid_argument("page_size", f"page_size must be in [0, {MAX_PAGE_SIZE}]")
            if request.state_filter not in adapter_pb2.AdapterState.values():
                raise invalid_argument("state_filter", f"unknown state {request.state_filter}")
            state = "" if request.state_filter == 0 else STATES[request.state_filter - 1]
            records, token, total = await self.registry.list(request.page_size or DEFAULT_PAGE_SIZE,
                                                             request.page_token, state)
            return registry_service_pb2.ListAdaptersResponse(
                adapters=[adapter_to_proto(r) for r in records], next_page_token=token, total_size=total)
        except LoraplaneError as e:
            await abort(context, e)

    async def DeleteAdapter(self, request, context):
        try:
            name = validate_name(request.name)
            version, refs = await self.registry.delete(name, request.etag)
            self.on_change(name)
            logger.info("adapter %s deleted (version %s)", name, version or "none")
            if version and refs == 0:
                await self.ingestor.drop_if_unused(version)
            return registry_service_pb2.DeleteAdapterResponse()
        except LoraplaneError as e:
            await abort(context, e)

    async def _set_pinned(self, request, context, pinned: bool):
        record = await self.registry.set_pinned(validate_name(request.name), pinned, request.etag)
        self.on_change(record.name)
        logger.info("adapter %s %s", record.name, "pinned" if pinned else "unpinned")
        return adapter_to_proto(record)

    async def PinAdapter(self, request, context):
        try:
            return registry_service_pb2.PinAdapterResponse(adapter=await self._set_pinned(request, context, True))
        except LoraplaneError as e:
            await abort(context, e)

    async def UnpinAdapter(self, request, context):
        try:
            return registry_service_pb2.UnpinAdapterResponse(adapter=await self._set_pinned(request, context, False))
        except LoraplaneError as e:
            await abort(context, e)

    async def WatchAdapters(self, request, context):
        after = request.after_event_id
        try:
            if after and not _valid_stream_id(after):
                raise invalid_argument("after_event_id", "after_event_id must be a stream id like 1700000000000-0")
            if not after:
                after = await self.registry.last_event_id()
            while not context.done():
                for event_id, data in await self.registry.read_events(after, WATCH_BLOCK_MS):
                    after = event_id
                    yield registry_service_pb2.WatchAdaptersResponse(event=event_to_proto(event_id, data))
        except LoraplaneError as e:
            await abort(context, e)


def _valid_stream_id(value: str) -> bool:
    # What Redis accepts: ASCII digits (str.isdigit also takes other scripts' digits), 64-bit parts.
    ms, sep, seq = value.partition("-")
    parts = (ms, seq) if sep else (ms,)
    return len(value) < 48 and all(p.isascii() and p.isdigit() and int(p) < 2**64 for p in parts)



