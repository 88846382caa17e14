"""Pull adapters from the control plane: resolve a name, stream the artifact, verify its digest.

Transient failures (control plane restarting, a dropped stream) are retried with backoff, and
a broken stream resumes from the last byte received; a digest mismatch is never accepted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

import grpc

from loraplane.auth import bearer
from loraplane.errors import LoraplaneError
from loraplane.grpc_server import MAX_MESSAGE_BYTES
from loraplane.tls import ClientTlsFiles
from loraplane.v1 import adapter_pb2
from loraplane.v1 import distribution_service_pb2 as dist_pb2
from loraplane.v1 import distribution_service_pb2_grpc as dist_grpc
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.ABORTED}


@dataclass(frozen=True)
class FetcherConfig:
    target: str
    token: str | None = None
    tls_files: ClientTlsFiles | None = None  # TLS with this CA (and client certificate), followed as it rotates
    tls: bool = False                        # TLS with the system's roots, when tls_files is None
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.2
    max_concurrent: int = 4

    def __post_init__(self) -> None:
        if not self.target:
            raise ValueError("the control plane address is required (--control-plane HOST:PORT)")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.max_concurrent < 1:
            raise ValueError("fetch timeout > 0, retries >= 0, backoff >= 0 and concurrency >= 1 are required")


class Fetcher:
    def __init__(self, config: FetcherConfig):
        self.config = config
        self.metadata = bearer(config.token) if config.token else ()
        self._sem = asyncio.Semaphore(config.max_concurrent)
        self.fetches = 0  # artifacts actually streamed, for tests and metrics
        self._closed = False
        # Channels replaced after a TLS rotation, finishing their calls in flight: (channel, closing task).
        self._retired: list[tuple[grpc.aio.Channel, asyncio.Task]] = []
        self._connect(config.tls_files.initial if config.tls_files else
                      grpc.ssl_channel_credentials() if config.tls else None)

    def _connect(self, credentials: grpc.ChannelCredentials | None) -> None:
        # Reconnect quickly once a restarted control plane is back, not after gRPC's default 2-minute cap.
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        self.channel = (grpc.aio.secure_channel(self.config.target, credentials, options) if credentials
                        else grpc.aio.insecure_channel(self.config.target, options))
        self.stub = dist_grpc.AdapterDistributionServiceStub(self.channel)

    def _follow_rotation(self) -> None:
        """A new channel when the TLS files changed: a handshake presents the certificate it was built
        with, so a long-lived channel would keep an expired one. Calls in flight finish on the old one."""
        credentials = self.config.tls_files.poll() if self.config.tls_files and not self._closed else None
        if credentials is None:
            return
        old = self.channel
        self._connect(credentials)
        self._retired.append((old, asyncio.get_running_loop().create_task(old.close(grace=self.config.timeout_s))))

    async def close(self) -> None:
        """Closes every channel now, a retired one still finishing its calls included."""
        self._closed = True
        for _, closing in self._retired:
            closing.cancel()
        channels = [self.channel, *(channel for channel, _ in self._retired)]
        results = await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                logger.warning("closing a channel to the control plane failed: %r", result)

    def _unavailable(self, error: grpc.RpcError) -> LoraplaneError:
        detail = f": {error.code().name} {error.details()}"
        return LoraplaneError(R.ERROR_REASON_CONTROL_PLANE_UNAVAILABLE,
                              f"the control plane at {self.config.target} is unavailable{detail}")

    async def _retrying(self, attempt):
        last: LoraplaneError | None = None
        for i in range(self.config.retries + 1):
            try:
                return await attempt()
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    # This replica's credentials, not the caller's: passed through, a user who sent
                    # no token at all was told their call lacked one.
                    logger.error("the control plane at %s refused this data plane: %s %s (check "
                                 "--distribution-token)", self.config.target, e.code().name, e.details())
                    raise LoraplaneError(R.ERROR_REASON_CONTROL_PLANE_UNAVAILABLE,
                                         "the control plane refused this data plane's credentials; "
                                         "see the data plane's log") from None
                if e.code() not in _TRANSIENT:
                    raise LoraplaneError.from_rpc_error(e) from None
                last = self._unavailable(e)
            except LoraplaneError as e:
                if e.reason != R.ERROR_REASON_DIGEST_MISMATCH:
                    raise
                last = e
            logger.warning("control plane call failed (%s), attempt %d/%d", last.message, i + 1,
                           self.config.retries + 1)
            if i < self.config.retries:
                await asyncio.sleep(self.config.backoff_s * 2**i)
        raise last

    async def resolve(self, ref: str) -> adapter_pb2.AdapterManifest:
        async def attempt():
            self._follow_rotation()
            resp = await self.stub.ResolveAdapter(dist_pb2.ResolveAdapterRequest(name=ref), metadata=self.metadata,
                                                  timeout=self.config.timeout_s)
            return resp.manifest

        return await self._retrying(attempt)

    async def fetch(self, name: str, version: str) -> bytes:
        """The artifact bytes, hashing to `version`, resumed across broken streams."""
        async with self._sem:
            received = bytearray()

            async def attempt():
                self._follow_rotation()
                if received:
                    logger.info("resuming the fetch of %s at byte %d", name, len(received))
                call = self.stub.FetchAdapter(
                    dist_pb2.FetchAdapterRequest(name=name, version=version, offset=len(received)),
                    metadata=self.metadata, timeout=self.config.timeout_s)
                async for msg in call:
                    if msg.data:
                        if msg.offset != len(received):
                            raise LoraplaneError(R.ERROR_REASON_DIGEST_MISMATCH, "artifact stream skipped bytes")
                        received.extend(msg.data)
                digest = "sha256:" + hashlib.sha256(received).hexdigest()
                if digest != version:
                    received.clear()  # start over: never keep bytes that failed verification
                    raise LoraplaneError(R.ERROR_REASON_DIGEST_MISMATCH,
                                         f"fetched artifact of {name} hashes to {digest}, expected {version}")
                return bytes(received)

            data = await self._retrying(attempt)
            self.fetches += 1
            return data
