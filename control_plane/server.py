"""The control-plane process: registry + distribution over gRPC, health, reflection, SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets

import torch

from control_plane.artifact_store import ArtifactStore
from control_plane.config import ControlPlaneConfig
from control_plane.distribution_service import DistributionServicer
from control_plane.ingest import Ingestor, IngestSettings
from control_plane.registry import Registry
from control_plane.registry_service import RegistryServicer
from control_plane.sources import SourceConfig
from loraplane.auth import BearerTokenInterceptor
from loraplane.embedded_redis import EmbeddedRedis, remembered_port
from loraplane.errors import LoraplaneError
from loraplane.grpc_server import (
    GrpcServer,
    bounded_step,
    cancel_tasks,
    freeze_startup_heap,
    install_signal_handlers,
)
from loraplane.model_spec import ModelSpec
from loraplane.tls import server_credentials
from loraplane.v1 import (
    distribution_service_pb2,
    distribution_service_pb2_grpc,
    registry_service_pb2,
    registry_service_pb2_grpc,
)

logger = logging.getLogger(__name__)
REGISTRY_SERVICE = registry_service_pb2.DESCRIPTOR.services_by_name["AdapterRegistryService"].full_name
DISTRIBUTION_SERVICE = distribution_service_pb2.DESCRIPTOR.services_by_name["AdapterDistributionService"].full_name
HEALTH_INTERVAL_S = 2.0
SWEEP_INTERVAL_S = 10.0


class ControlPlane:
    def __init__(self, config: ControlPlaneConfig):
        self.config = config
        self.embedded_redis: EmbeddedRedis | None = None
        self.registry: Registry | None = None
        self.grpc: GrpcServer | None = None
        self.ingestor: Ingestor | None = None
        self._background: list[asyncio.Task] = []
        self._stopping = False
        self.admin_token = config.admin_token

    @property
    def port(self) -> int:
        return self.grpc.port if self.grpc else 0

    async def start(self) -> ControlPlane:
        c = self.config
        spec = await asyncio.to_thread(ModelSpec.from_pretrained, c.base_model, c.base_model_revision,
                                       endpoint=c.hf_endpoint, token=c.hf_token)
        c.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.admin_token:
            self.admin_token = self._generated_admin_token()
        redis_url = c.redis_url
        if not redis_url:
            redis_dir = c.data_dir / "redis"
            self.embedded_redis = await asyncio.to_thread(EmbeddedRedis(redis_dir, remembered_port(redis_dir)).start)
            redis_url = self.embedded_redis.url
            logger.info("registry: embedded Redis at %s (data planes: --redis-url %s)", redis_url, redis_url)
        self.registry = Registry.from_url(redis_url, c.redis_prefix)
        store = ArtifactStore(c.artifact_dir)
        await asyncio.to_thread(store.remove_stale_scratch)
        sources = SourceConfig(allowed_roots=c.allowed_roots, hf_token=c.hf_token, hf_endpoint=c.hf_endpoint,
                               s3_endpoint_url=c.s3_endpoint_url, s3_anon=c.s3_anon, max_bytes=c.max_adapter_bytes,
                               timeout_s=c.source_timeout_s)
        self.ingestor = Ingestor(self.registry, store, IngestSettings(
            spec=spec, sources=sources, max_rank=c.max_lora_rank, max_bytes=c.max_adapter_bytes,
            dtype=c.artifact_dtype, owner=c.replica_id, lease_ms=c.lease_ms, concurrency=c.max_concurrent_ingests))
        tokens = {REGISTRY_SERVICE: [self.admin_token]}
        if c.distribution_token:
            tokens[DISTRIBUTION_SERVICE] = [c.distribution_token, self.admin_token]
        else:
            logger.warning("no distribution token: AdapterDistributionService is open to any client that can reach it")
        self.grpc = GrpcServer([REGISTRY_SERVICE, DISTRIBUTION_SERVICE], [BearerTokenInterceptor(tokens)])
        names = {c.base_model, spec.name, spec.name.rstrip("/").rsplit("/", 1)[-1]}
        distribution = DistributionServicer(self.registry, store)
        registry_service_pb2_grpc.add_AdapterRegistryServiceServicer_to_server(
            RegistryServicer(self.registry, self.ingestor, sources, names, on_change=distribution.invalidate),
            self.grpc.server)
        distribution_service_pb2_grpc.add_AdapterDistributionServiceServicer_to_server(distribution, self.grpc.server)
        self.grpc.listen(c.listen, server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca))
        if c.health_listen is not None:
            self.grpc.listen_health(c.health_listen)
        await self.grpc.start()
        self._background = [asyncio.create_task(self._watch_health(), name="registry-health"),
                            asyncio.create_task(self._sweep(), name="orphan-sweep"),
                            asyncio.create_task(distribution.follow_events(), name="resolve-cache-events")]
        logger.info("control plane %s listening on port %d (base model %s, %s, artifacts in %s)", c.replica_id,
                    self.port, spec.name, "embedded redis" if self.embedded_redis else "external redis",
                    c.artifact_dir)
        return self

    def _generated_admin_token(self) -> str:
        # Secure by default: never run the admin API open. The token goes to a 0600 file, not the log.
        path = self.config.data_dir / "admin-token"
        token = path.read_text(encoding="utf-8").strip() if path.exists() else ""
        if not token:
            # Empty (a crash mid-write, or a hand-made file): an empty token would accept an empty header.
            if path.exists():
                logger.warning("%s is empty; writing a new admin token", path)
            token = secrets.token_urlsafe(32)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(token + "\n")
            os.replace(tmp, path)  # whole or absent, never half-written
        logger.warning("no admin token configured; using the one in %s", path)
        return token

    async def _watch_health(self) -> None:
        """Ready only while Redis answers; flips back on its own when Redis returns."""
        serving = None
        while not self._stopping:
            try:
                ok = await self.registry.ping()
            except LoraplaneError:
                ok = False
            if ok != serving:
                serving = ok
                await self.grpc.set_serving(ok)
                (logger.info if ok else logger.warning)("registry %s", "reachable: SERVING" if ok else "unreachable: NOT_SERVING")
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _sweep(self) -> None:
        while not self._stopping:
            try:
                await self.ingestor.resume_orphans()
            except LoraplaneError as e:
                logger.debug("orphan sweep skipped: %s", e)
            except Exception:
                # Only this process resumes what a dead replica left PENDING: the loop must outlive a bug.
                logger.exception("orphan sweep failed; trying again in %d s", SWEEP_INTERVAL_S)
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def stop(self) -> None:
        """Drain and stop. Every step is bounded, so a SIGTERM always ends the process: a step that
        overruns is logged by name and the rest still run."""
        self._stopping = True
        # The sweep and health loops first, while Redis is still open: a loop that lost its
        # cancellation inside a Redis call must not keep resuming ingests during the drain.
        await cancel_tasks(self._background)
        if self.ingestor:
            self.ingestor.closing = True  # a sweep that outlived its cancel resumes nothing more
        if self.grpc:
            await self.grpc.drain(self.config.grace_period_s)
        if self.ingestor:
            await bounded_step("cancelling ingests", self.ingestor.close())
        if self.registry:
            await bounded_step("closing the Redis connection", self.registry.close())
        if self.embedded_redis:
            await bounded_step("stopping the embedded Redis", asyncio.to_thread(self.embedded_redis.stop))
        logger.info("control plane stopped")


async def serve(config: ControlPlaneConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain for the grace period."""
    # Normalization is memory-bound elementwise work; OpenMP worker threads only add contention
    # (10-40x slower sums measured on a busy 2-core host), so this process keeps torch single-threaded.
    # Set here, not in ControlPlane.start: a process hosting the control plane next to an engine
    # (tests, benchmarks) must keep its own thread count.
    torch.set_num_threads(1)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    plane = await ControlPlane(config).start()
    logger.debug("%d start-up objects frozen out of the GC", freeze_startup_heap())
    try:
        await stop.wait()
        logger.info("signal received: draining for up to %.0fs", config.grace_period_s)
    finally:
        await plane.stop()
