"""Thin client facade over the generated stubs: `Client` (blocking) and `AsyncClient` (asyncio).

One client talks to one address: a control plane (registry, distribution) or a data plane
(generation, cache). Every failure is raised as LoraplaneError with its code and reason.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import AsyncIterator, Iterator

import grpc

from loraplane.auth import bearer
from loraplane.errors import LoraplaneError
from loraplane.grpc_server import MAX_MESSAGE_BYTES
from loraplane.v1 import adapter_pb2
from loraplane.v1 import cache_service_pb2 as cache_pb2
from loraplane.v1 import cache_service_pb2_grpc as cache_grpc
from loraplane.v1 import distribution_service_pb2 as dist_pb2
from loraplane.v1 import distribution_service_pb2_grpc as dist_grpc
from loraplane.v1 import errors_pb2 as R
from loraplane.v1 import generation_service_pb2 as gen_pb2
from loraplane.v1 import generation_service_pb2_grpc as gen_grpc
from loraplane.v1 import registry_service_pb2 as reg_pb2
from loraplane.v1 import registry_service_pb2_grpc as reg_grpc

_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def _state(state: str | int | None) -> int:
    if state is None or state == "":
        return 0
    if isinstance(state, int):
        return state
    return adapter_pb2.AdapterState.Value("ADAPTER_STATE_" + state.upper())


def _raising(fn):
    """Re-raise grpc errors as LoraplaneError, for plain, generator and async methods alike."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def agen(*a, **k):
            try:
                async for item in fn(*a, **k):
                    yield item
            except grpc.RpcError as e:
                raise LoraplaneError.from_rpc_error(e) from None
        return agen
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def coro(*a, **k):
            try:
                return await fn(*a, **k)
            except grpc.RpcError as e:
                raise LoraplaneError.from_rpc_error(e) from None
        return coro
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*a, **k):
            try:
                yield from fn(*a, **k)
            except grpc.RpcError as e:
                raise LoraplaneError.from_rpc_error(e) from None
        return gen

    @functools.wraps(fn)
    def plain(*a, **k):
        try:
            return fn(*a, **k)
        except grpc.RpcError as e:
            raise LoraplaneError.from_rpc_error(e) from None
    return plain


def generate_request(prompt: str | list[int], adapter: str = "", *, request_id: str = "",
                     max_tokens: int | None = None, temperature: float = 0.0, top_p: float | None = None,
                     top_k: int = 0, seed: int | None = None, stop: str | list[str] | tuple = (),
                     stop_token_ids: list[int] | tuple = (), ignore_eos: bool = False) -> gen_pb2.GenerateRequest:
    """The GenerateRequest for a text prompt (str) or token ids (a list of ints). `stop` is one stop
    string or a list of them, as in vLLM's SamplingParams."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        # Iterating bytes yields ints, which would go out as token ids without a word.
        raise TypeError(f"prompt must be a str (text) or a list of ints (token ids), not {type(prompt).__name__}; "
                        "decode bytes to str first")
    stop = [stop] if isinstance(stop, str) else list(stop)
    sampling = gen_pb2.SamplingParams(temperature=temperature, top_k=top_k, stop=stop,
                                      stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    req = gen_pb2.GenerateRequest(request_id=request_id, adapter=adapter, sampling=sampling)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.extend(prompt)
    return req


class _TextJoiner:
    """generate_text's result, for Client and AsyncClient alike: the streamed texts joined, and
    the last message (finish reason, usage, adapter version)."""

    def __init__(self):
        self.parts: list[str] = []
        self.last: gen_pb2.GenerateResponse | None = None

    def add(self, msg: gen_pb2.GenerateResponse) -> None:
        self.parts.append(msg.text)
        self.last = msg

    def result(self) -> tuple[str, gen_pb2.GenerateResponse]:
        return "".join(self.parts), self.last


# The AdapterCacheService requests, shared by Client and AsyncClient.

def _list_cached_request() -> cache_pb2.ListCachedAdaptersRequest:
    return cache_pb2.ListCachedAdaptersRequest()


def _prefetch_request(name: str, tier: int) -> cache_pb2.PrefetchAdapterRequest:
    return cache_pb2.PrefetchAdapterRequest(name=name, tier=tier)


def _evict_request(name: str, tier: int) -> cache_pb2.EvictAdapterRequest:
    return cache_pb2.EvictAdapterRequest(name=name, tier=tier)


def _credentials(tls: bool, root_certificates: bytes | None, client_cert: tuple[bytes, bytes] | None):
    if not tls and not root_certificates and not client_cert:
        return None
    key, chain = client_cert or (None, None)
    return grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=key, certificate_chain=chain)


def _verified(chunks: list[bytes], digest: str, version: str) -> bytes:
    data = b"".join(chunks)
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != version or (digest and digest != version):
        raise LoraplaneError(R.ERROR_REASON_DIGEST_MISMATCH, f"fetched bytes hash to {actual}, expected {version}")
    return data


class _ClientTimeout:
    """A call's default deadline: the client's own. None means no deadline at all, so it cannot
    stand for "not given" (a register --wait on a large Hub adapter was cut off at 60 s)."""

    def __repr__(self) -> str:
        return "CLIENT_TIMEOUT"


CLIENT_TIMEOUT = _ClientTimeout()


class _Stubs:
    """The four service stubs over one channel, and the per-call metadata and deadline."""

    def __init__(self, channel, token: str | None, timeout: float | None):
        self.metadata = bearer(token) if token else ()
        self.timeout = timeout
        self.registry = reg_grpc.AdapterRegistryServiceStub(channel)
        self.distribution = dist_grpc.AdapterDistributionServiceStub(channel)
        self.generation = gen_grpc.GenerationServiceStub(channel)
        self.cache = cache_grpc.AdapterCacheServiceStub(channel)

    def _kw(self, timeout: float | None | _ClientTimeout = CLIENT_TIMEOUT):
        return {"metadata": self.metadata, "timeout": self.timeout if timeout is CLIENT_TIMEOUT else timeout}


class Client(_Stubs):
    def __init__(self, target: str, token: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | None = None, client_cert: tuple[bytes, bytes] | None = None,
                 timeout: float | None = 60.0):
        creds = _credentials(tls, root_certificates, client_cert)
        self.channel = (grpc.secure_channel(target, creds, _OPTIONS) if creds
                        else grpc.insecure_channel(target, _OPTIONS))
        super().__init__(self.channel, token, timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @_raising
    def create_adapter(self, name: str, source: str, *, revision: str = "", wait: bool = False,
                       pinned: bool = False, base_model: str = "",
                       timeout: float | None | _ClientTimeout = CLIENT_TIMEOUT) -> adapter_pb2.Adapter:
        req = reg_pb2.CreateAdapterRequest(name=name, source=source, revision=revision, wait=wait, pinned=pinned,
                                           base_model=base_model)
        return self.registry.CreateAdapter(req, **self._kw(timeout)).adapter

    @_raising
    def get_adapter(self, name: str) -> adapter_pb2.Adapter:
        return self.registry.GetAdapter(reg_pb2.GetAdapterRequest(name=name), **self._kw()).adapter

    @_raising
    def list_adapters_page(self, page_size: int = 0, page_token: str = "", state=None) -> reg_pb2.ListAdaptersResponse:
        req = reg_pb2.ListAdaptersRequest(page_size=page_size, page_token=page_token, state_filter=_state(state))
        return self.registry.ListAdapters(req, **self._kw())

    def list_adapters(self, state=None, page_size: int = 100) -> Iterator[adapter_pb2.Adapter]:
        token = ""
        while True:
            page = self.list_adapters_page(page_size, token, state)
            yield from page.adapters
            token = page.next_page_token
            if not token:
                return

    @_raising
    def delete_adapter(self, name: str, etag: str = "") -> None:
        self.registry.DeleteAdapter(reg_pb2.DeleteAdapterRequest(name=name, etag=etag), **self._kw())

    @_raising
    def pin_adapter(self, name: str, etag: str = "") -> adapter_pb2.Adapter:
        return self.registry.PinAdapter(reg_pb2.PinAdapterRequest(name=name, etag=etag), **self._kw()).adapter

    @_raising
    def unpin_adapter(self, name: str, etag: str = "") -> adapter_pb2.Adapter:
        return self.registry.UnpinAdapter(reg_pb2.UnpinAdapterRequest(name=name, etag=etag), **self._kw()).adapter

    @_raising
    def watch_adapters(self, after_event_id: str = "", timeout: float | None = None) -> Iterator[adapter_pb2.AdapterEvent]:
        req = reg_pb2.WatchAdaptersRequest(after_event_id=after_event_id)
        call = self.registry.WatchAdapters(req, metadata=self.metadata, timeout=timeout)
        try:
            for msg in call:
                yield msg.event
        finally:  # closing the iterator ends the server stream too
            call.cancel()

    @_raising
    def resolve_adapter(self, ref: str) -> adapter_pb2.AdapterManifest:
        return self.distribution.ResolveAdapter(dist_pb2.ResolveAdapterRequest(name=ref), **self._kw()).manifest

    @_raising
    def fetch_adapter(self, name: str, version: str) -> bytes:
        """The artifact's bytes, verified against `version`."""
        chunks, digest = [], ""
        for msg in self.distribution.FetchAdapter(dist_pb2.FetchAdapterRequest(name=name, version=version),
                                                  **self._kw()):
            chunks.append(msg.data)
            digest = msg.digest or digest
        return _verified(chunks, digest, version)

    # ---- data plane -----------------------------------------------------------------------

    @_raising
    def generate(self, prompt: str | list[int], adapter: str = "", *,
                 timeout: float | None | _ClientTimeout = CLIENT_TIMEOUT,
                 **sampling) -> Iterator[gen_pb2.GenerateResponse]:
        """Stream a generation; closing the iterator cancels the request on the server. The timeout
        (the client's, 60 s unless set) bounds the whole stream: give a long generation a longer one,
        or None for no deadline."""
        call = self.generation.Generate(generate_request(prompt, adapter, **sampling), **self._kw(timeout))
        try:
            yield from call
        finally:
            call.cancel()

    def generate_text(self, prompt: str | list[int], adapter: str = "", **kw) -> tuple[str, gen_pb2.GenerateResponse]:
        """The whole text, and the last message (finish reason, usage, adapter version)."""
        joined = _TextJoiner()
        for msg in self.generate(prompt, adapter, **kw):
            joined.add(msg)
        return joined.result()

    @_raising
    def get_model_info(self) -> gen_pb2.GetModelInfoResponse:
        return self.generation.GetModelInfo(gen_pb2.GetModelInfoRequest(), **self._kw())

    @_raising
    def list_cached_adapters(self) -> cache_pb2.ListCachedAdaptersResponse:
        return self.cache.ListCachedAdapters(_list_cached_request(), **self._kw())

    @_raising
    def prefetch_adapter(self, name: str, tier: int = 0) -> cache_pb2.CachedAdapter:
        return self.cache.PrefetchAdapter(_prefetch_request(name, tier), **self._kw()).adapter

    @_raising
    def evict_adapter(self, name: str, tier: int = 0) -> None:
        self.cache.EvictAdapter(_evict_request(name, tier), **self._kw())


class AsyncClient(_Stubs):
    def __init__(self, target: str, token: str | None = None, *, tls: bool = False,
                 root_certificates: bytes | None = None, client_cert: tuple[bytes, bytes] | None = None,
                 timeout: float | None = 60.0):
        creds = _credentials(tls, root_certificates, client_cert)
        self.channel = (grpc.aio.secure_channel(target, creds, _OPTIONS) if creds
                        else grpc.aio.insecure_channel(target, _OPTIONS))
        super().__init__(self.channel, token, timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @_raising
    async def create_adapter(self, name: str, source: str, *, revision: str = "", wait: bool = False,
                             pinned: bool = False, base_model: str = "",
                             timeout: float | None | _ClientTimeout = CLIENT_TIMEOUT):
        req = reg_pb2.CreateAdapterRequest(name=name, source=source, revision=revision, wait=wait, pinned=pinned,
                                           base_model=base_model)
        return (await self.registry.CreateAdapter(req, **self._kw(timeout))).adapter

    @_raising
    async def get_adapter(self, name: str):
        return (await self.registry.GetAdapter(reg_pb2.GetAdapterRequest(name=name), **self._kw())).adapter

    @_raising
    async def list_adapters_page(self, page_size: int = 0, page_token: str = "", state=None):
        req = reg_pb2.ListAdaptersRequest(page_size=page_size, page_token=page_token, state_filter=_state(state))
        return await self.registry.ListAdapters(req, **self._kw())

    async def list_adapters(self, state=None, page_size: int = 100) -> AsyncIterator[adapter_pb2.Adapter]:
        token = ""
        while True:
            page = await self.list_adapters_page(page_size, token, state)
            for adapter in page.adapters:
                yield adapter
            token = page.next_page_token
            if not token:
                return

    @_raising
    async def delete_adapter(self, name: str, etag: str = "") -> None:
        await self.registry.DeleteAdapter(reg_pb2.DeleteAdapterRequest(name=name, etag=etag), **self._kw())

    @_raising
    async def pin_adapter(self, name: str, etag: str = ""):
        return (await self.registry.PinAdapter(reg_pb2.PinAdapterRequest(name=name, etag=etag), **self._kw())).adapter

    @_raising
    async def unpin_adapter(self, name: str, etag: str = ""):
        req = reg_pb2.UnpinAdapterRequest(name=name, etag=etag)
        return (await self.registry.UnpinAdapter(req, **self._kw())).adapter

    @_raising
    async def watch_adapters(self, after_event_id: str = "", timeout: float | None = None):
        req = reg_pb2.WatchAdaptersRequest(after_event_id=after_event_id)
        async for msg in self.registry.WatchAdapters(req, metadata=self.metadata, timeout=timeout):
            yield msg.event

    @_raising
    async def resolve_adapter(self, ref: str):
        return (await self.distribution.ResolveAdapter(dist_pb2.ResolveAdapterRequest(name=ref), **self._kw())).manifest

    @_raising
    async def fetch_adapter(self, name: str, version: str) -> bytes:
        chunks, digest = [], ""
        call = self.distribution.FetchAdapter(dist_pb2.FetchAdapterRequest(name=name, version=version), **self._kw())
        async for msg in call:
            chunks.append(msg.data)
            digest = msg.digest or digest
        return _verified(chunks, digest, version)

    @_raising
    async def generate(self, prompt: str | list[int], adapter: str = "", *,
                       timeout: float | None | _ClientTimeout = CLIENT_TIMEOUT,
                       **sampling) -> AsyncIterator[gen_pb2.GenerateResponse]:
        """As Client.generate: the timeout bounds the whole stream."""
        call = self.generation.Generate(generate_request(prompt, adapter, **sampling), **self._kw(timeout))
        try:
            async for msg in call:
                yield msg
        finally:
            call.cancel()

    @_raising
    async def get_model_info(self) -> gen_pb2.GetModelInfoResponse:
        return await self.generation.GetModelInfo(gen_pb2.GetModelInfoRequest(), **self._kw())

    async def generate_text(self, prompt: str | list[int], adapter: str = "",
                            **kw) -> tuple[str, gen_pb2.GenerateResponse]:
        """The whole text, and the last message (finish reason, usage, adapter version)."""
        joined = _TextJoiner()
        async for msg in self.generate(prompt, adapter, **kw):
            joined.add(msg)
        return joined.result()

    @_raising
    async def list_cached_adapters(self) -> cache_pb2.ListCachedAdaptersResponse:
        return await self.cache.ListCachedAdapters(_list_cached_request(), **self._kw())

    @_raising
    async def prefetch_adapter(self, name: str, tier: int = 0) -> cache_pb2.CachedAdapter:
        return (await self.cache.PrefetchAdapter(_prefetch_request(name, tier), **self._kw())).adapter

    @_raising
    async def evict_adapter(self, name: str, tier: int = 0) -> None:
        await self.cache.EvictAdapter(_evict_request(name, tier), **self._kw())
