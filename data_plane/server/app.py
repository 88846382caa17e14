"""The data-plane process: engine thread, adapter tiers, GenerationService + AdapterCacheService,
registry events, heartbeat, metrics, health and a SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from redis.exceptions import RedisError

from control_plane.registry import Registry
from data_plane.engine.config import EngineConfig
from data_plane.engine.engine import Engine
from data_plane.engine.request import SamplingParams
from data_plane.lora.adapter_cache import AdapterCache
from data_plane.lora.cpu_cache import CpuCache
from data_plane.lora.disk_cache import DiskCache
from data_plane.lora.fetcher import Fetcher
from data_plane.lora.slot_table import SlotTable
from data_plane.server.cache_service import CacheServicer
from data_plane.server.config import DataPlaneConfig
from data_plane.server.engine_loop import EngineLoop
from data_plane.server.events import RegistryWatcher
from data_plane.server.generation_service import GenerationServicer
from data_plane.server.heartbeat import heartbeat
from data_plane.server.metrics import Metrics
from loraplane.auth import BearerTokenInterceptor
from loraplane.errors import LoraplaneError
from loraplane.grpc_server import (
    GrpcServer,
    bounded_step,
    cancel_tasks,
    freeze_startup_heap,
    install_signal_handlers,
)
from loraplane.tls import server_credentials
from loraplane.v1 import (
    cache_service_pb2,
    cache_service_pb2_grpc,
    generation_service_pb2,
    generation_service_pb2_grpc,
)
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)
AFTER_DRAIN_S = 2.0  # grace for the other RPCs once no Generate stream is left
ENGINE_WATCH_S = 1.0
GENERATION_SERVICE = generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
CACHE_SERVICE = cache_service_pb2.DESCRIPTOR.services_by_name["AdapterCacheService"].full_name
MAX_QUEUE_FACTOR = 8  # queued + running requests a replica accepts, per max_num_seqs


class DataPlane:
    def __init__(self, config: DataPlaneConfig):
        self.config = config
        self.engine_loop: EngineLoop | None = None
        self.grpc: GrpcServer | None = None
        self.registry: Registry | None = None
        self.watcher: RegistryWatcher | None = None
        self._tasks: list[asyncio.Task] = []
        self._metrics_server = None

    @property
    def port(self) -> int:
        return self.grpc.port if self.grpc else 0

    def _engine(self) -> Engine:
        c = self.config
        engine = Engine(EngineConfig(model=c.model, max_loras=c.max_loras, max_lora_rank=c.max_lora_rank,
                                     max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len,
                                     max_num_batched_tokens=c.max_num_batched_tokens,
                                     enable_prefix_caching=c.enable_prefix_caching, dtype=c.dtype,
                                     device=c.device, kv_cache_bytes=c.kv_cache_bytes))
        # Warm up (allocator, kernels, lazy imports) before readiness says SERVING.
        engine.generate([[0, 1, 2]], sampling=SamplingParams(max_tokens=2, ignore_eos=True))
        engine.blocks.reset_prefix_stats()  # the metrics count users' prompts only
        return engine

    async def start(self) -> DataPlane:
        c = self.config
        if not (Path(c.model).expanduser() / "config.json").is_file():
            raise ValueError(f"--model {c.model} is not a model directory (no config.json); the data plane "
                             "loads its base model from a local directory")
        model_name = Path(c.model).name or c.model
        cpu = CpuCache(c.max_cpu_loras, c.max_cpu_lora_bytes, pin_memory=c.device.startswith("cuda"))
        disk = DiskCache(c.disk_cache_dir, c.disk_cache_bytes)
        slots = SlotTable(c.max_loras, c.max_pinned_loras)
        self.metrics = Metrics(lambda: self.engine_loop.stats, model_name, c.max_loras)
        # Built in the thread that will step it (see EngineLoop.build_and_start for why).
        self.engine_loop = await asyncio.to_thread(EngineLoop.build_and_start, self._engine, cpu, slots,
                                                   self.metrics.promoted)
        engine = self.engine_loop.engine
        self.fetcher = Fetcher(c.fetcher_config())
        self.cache = AdapterCache(self.fetcher, cpu, disk, self.metrics, check=engine.check_adapter)
        info = generation_service_pb2.GetModelInfoResponse(
            model=model_name, architecture=engine.spec.architecture, max_model_len=c.max_model_len,
            max_loras=c.max_loras, max_lora_rank=c.max_lora_rank, max_cpu_loras=c.max_cpu_loras,
            dtype=str(engine.dtype).removeprefix("torch."), vocab_size=engine.spec.vocab_size,
            replica_id=c.replica_id, device=c.device)
        self.generation = GenerationServicer(self.engine_loop, self.cache, self.metrics, info,
                                             max_queue=c.max_num_seqs * MAX_QUEUE_FACTOR)
        tokens = {CACHE_SERVICE: [c.admin_token]} if c.admin_token else {}
        if not c.admin_token:
            logger.warning("no --admin-token: AdapterCacheService (prefetch, evict) is open to every client")
        self.grpc = GrpcServer([GENERATION_SERVICE, CACHE_SERVICE], [BearerTokenInterceptor(tokens)])
        generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(self.generation, self.grpc.server)
        cache_service_pb2_grpc.add_AdapterCacheServiceServicer_to_server(
            CacheServicer(self.engine_loop, self.cache, lambda: self.generation.draining), self.grpc.server)
        self.grpc.listen(c.listen, server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca))
        if c.health_listen is not None:
            self.grpc.listen_health(c.health_listen)
        await self.grpc.start()
        address = c.advertise_address or c.listen.replace("0.0.0.0", "127.0.0.1").rsplit(":", 1)[0] + f":{self.port}"
        if c.redis_url:
            self.registry = Registry.from_url(c.redis_url, c.redis_prefix)
            self.watcher = RegistryWatcher(self.registry, self.cache, self.engine_loop)
            self._tasks += [asyncio.create_task(self.watcher.run()), asyncio.create_task(heartbeat(
                self.registry, c.replica_id, address, model_name, self.engine_loop, self.cache, c.heartbeat_s))]
        else:
            logger.warning("no --redis-url: no registry events (pins, deletes) and no heartbeat")
        if c.metrics_port is not None:
            self._metrics_server = self.metrics.serve(c.metrics_port, c.metrics_host)
        await self.grpc.set_serving(True)
        self._tasks.append(asyncio.create_task(self._watch_engine()))
        logger.info("data plane %s serving %s on port %d (%s, max_loras=%d, control plane %s)", c.replica_id,
                    model_name, self.port, c.device, c.max_loras, c.control_plane)
        return self

    async def _watch_engine(self) -> None:
        """An engine thread that broke (EngineLoop.broken) fails readiness and liveness, so the pod
        is restarted; its calls already fail fast with ENGINE_FAILURE."""
        while self.engine_loop.broken is None:
            await asyncio.sleep(ENGINE_WATCH_S)
        logger.critical("the engine is broken: readiness and liveness are now NOT_SERVING")
        await self.grpc.set_broken()

    async def stop(self) -> None:
        """Drain: refuse new requests, let in-flight streams finish within the grace period, then stop.

        Every step is bounded, so a SIGTERM always ends the process: a step that overruns is logged
        by name and the rest still run (a stuck close must not keep the replica holding its GPU).
        """
        if self.grpc:
            await self.grpc.set_serving(False)
        grace_s = self.config.grace_period_s
        if self.generation is not None:
            # The server keeps listening while streams finish, so a call that arrives before the
            # routers have seen readiness drop gets UNAVAILABLE/SERVER_NOT_READY (retry elsewhere)
            # from the handler, not whatever grpc core answers once it stops.
            self.generation.draining = True
            logger.info("draining %d in-flight requests (grace %.0fs)", self.generation.active, grace_s)
            t0 = time.monotonic()
            if await self.generation.wait_drained(grace_s):
                # What is left is short calls, and streams that never end by themselves (a health
                # Watch): they get a moment, not the rest of the grace period.
                grace_s = min(AFTER_DRAIN_S, max(0.0, grace_s - (time.monotonic() - t0)))
            else:
                logger.warning("grace period over with %d requests in flight; ending them",
                               self.generation.active)
                # Ended by the service, with a reason a client can act on; grpc's own cancel at
                # stop would give them UNAVAILABLE "Cancelling all calls" and no ErrorInfo.
                error = LoraplaneError(R.ERROR_REASON_SERVER_NOT_READY,
                                       "this replica stopped before the request finished (its grace period "
                                       "ran out); retry on another")
                self.generation.stop_error = error
                if self.engine_loop:
                    # Briefly: an engine thread too busy to take this is often why streams overran.
                    await bounded_step("ending in-flight streams",
                                       self.engine_loop.acall(lambda _e: self.engine_loop.fail_streams(error)),
                                       AFTER_DRAIN_S)
                await self.generation.wait_drained(AFTER_DRAIN_S)
                grace_s = 0.0
        if self.grpc:
            await self.grpc.drain(grace_s)
        await cancel_tasks(self._tasks)
        if self.engine_loop:
            await asyncio.to_thread(self.engine_loop.stop)
        await bounded_step("closing the control-plane channel", self.fetcher.close())
        if self.registry:
            with contextlib.suppress(RedisError):  # best effort: the TTL removes it anyway
                await bounded_step("removing the heartbeat key",
                                   self.registry.client.delete(self.registry.replica_key(self.config.replica_id)))
            await bounded_step("closing the Redis connection", self.registry.close())
        if self._metrics_server:
            server, _thread = self._metrics_server
            server.shutdown()
        logger.info("data plane stopped")


async def serve(config: DataPlaneConfig) -> None:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    plane = await DataPlane(config).start()
    logger.debug("%d start-up objects frozen out of the GC", freeze_startup_heap())
    try:
        await stop.wait()
        logger.info("signal received: draining")
    finally:
        await plane.stop()
