"""GenerationService: validate, take the adapter's lease, hand the request to the engine thread, relay deltas."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from data_plane.engine.request import FinishReason, SamplingParams
from data_plane.lora.adapter_cache import AdapterCache
from data_plane.server.engine_loop import EngineLoop
from loraplane.errors import LoraplaneError, abort, invalid_argument
from loraplane.v1 import errors_pb2 as R
from loraplane.v1 import generation_service_pb2 as gen_pb2
from loraplane.v1 import generation_service_pb2_grpc as gen_grpc

logger = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 16
MAX_REQUEST_ID = 256
FINISH = {FinishReason.STOP: gen_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: gen_pb2.FINISH_REASON_LENGTH,
          FinishReason.ABORT: gen_pb2.FINISH_REASON_ABORT}


def sampling_from_proto(s: gen_pb2.SamplingParams) -> SamplingParams:
    """Proto defaults -> engine params; range checks happen in the engine (one place)."""
    return SamplingParams(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=s.temperature, top_p=s.top_p if s.HasField("top_p") else 1.0, top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos)


def prompt_from_proto(req: gen_pb2.GenerateRequest) -> str | list[int]:
    if req.prompt and req.prompt_token_ids:
        raise invalid_argument("prompt", "give prompt or prompt_token_ids, not both")
    if not req.prompt and not req.prompt_token_ids:
        raise invalid_argument("prompt", "prompt (or prompt_token_ids) is required")
    return req.prompt or list(req.prompt_token_ids)


class GenerationServicer(gen_grpc.GenerationServiceServicer):
    def __init__(self, loop: EngineLoop, cache: AdapterCache, metrics, model_info: gen_pb2.GetModelInfoResponse,
                 max_queue: int):
        self.loop = loop
        self.cache = cache
        self.metrics = metrics
        self.model_info = model_info
        self.max_queue = max_queue
        self.active = 0
        self.draining = False
        # Set when the grace period ran out: a call still getting ready (tokenizing, fetching its
        # adapter) ends with it rather than reach an engine that is stopping.
        self.stop_error: LoraplaneError | None = None
        # Client request ids of the calls in flight: a second call with one of them is refused, as
        # its stream and aborts would otherwise be confused with the first call's.
        self._client_ids: set[str] = set()

    async def wait_drained(self, timeout_s: float) -> bool:
        """Wait until no Generate call is in flight; False if timeout_s ran out first."""
        deadline = time.monotonic() + timeout_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.active

    async def GetModelInfo(self, request, context):
        return self.model_info

    async def Generate(self, request, context):
        arrival = time.perf_counter()
        if self.draining:
            await abort(context, LoraplaneError(R.ERROR_REASON_SERVER_NOT_READY,
                                                "this replica is draining; retry on another"))
        if self.active >= self.max_queue:
            await abort(context, LoraplaneError(R.ERROR_REASON_CAPACITY_EXHAUSTED,
                                                f"{self.active} requests already queued or running; retry later"))
        rid = request.request_id or uuid.uuid4().hex
        # The engine knows the request by an id of our own, never the client's: a retry that reuses
        # the id of a call still being torn down must not receive that call's outputs or aborts.
        engine_id = uuid.uuid4().hex
        lease = None
        finished = False
        submitted = False
        holds_id = False
        self.active += 1
        try:
            if len(rid) > MAX_REQUEST_ID:
                raise invalid_argument("request_id", f"request_id is over {MAX_REQUEST_ID} characters")
            if rid in self._client_ids:
                raise invalid_argument("request_id", "a request with this request_id is still in flight on this "
                                                     "replica; give each request its own id")
            self._client_ids.add(rid)
            holds_id = True
            sampling = sampling_from_proto(request.sampling)
            # Checked before the adapter is taken, so a bad request fetches and evicts nothing, and
            # tokenized here, in a worker thread: a long text prompt on the engine thread would
            # hold up every stream's next token while it tokenized.
            prompt = await asyncio.to_thread(self.loop.engine.check_request, prompt_from_proto(request), sampling)
            if request.adapter:
                lease = await self.cache.acquire(request.adapter)
            if self.stop_error is not None:
                raise self.stop_error
            self.metrics.adapter_requests.labels(lease.name if lease else "").inc()
            submitted = True
            outputs = await self.loop.submit(prompt, sampling, lease.key if lease else None, engine_id)
            last = None
            queued = False
            while not finished:
                out = await outputs.get()
                if isinstance(out, LoraplaneError):  # its batch failed, or its adapter cannot be loaded
                    raise out
                now = time.perf_counter()
                if not queued and out.first_scheduled is not None:
                    queued = True  # engine and service share one perf_counter: same process
                    self.metrics.queue_seconds.observe(max(0.0, out.first_scheduled - arrival))
                if out.token_ids:
                    (self.metrics.ttft_seconds.observe(now - arrival) if last is None
                     else self.metrics.itl_seconds.observe(now - last))
                    last = now
                finished = out.finished
                resp = gen_pb2.GenerateResponse(request_id=rid, token_ids=out.token_ids, text=out.text)
                if finished:
                    resp.finish_reason = FINISH[out.finish_reason]
                    resp.usage.prompt_tokens = out.prompt_tokens
                    resp.usage.completion_tokens = out.completion_tokens
                    resp.adapter_version = lease.version if lease else ""
                    self.metrics.request_seconds.labels(out.finish_reason.value).observe(now - arrival)
                yield resp
        except LoraplaneError as e:
            await abort(context, e)
        finally:
            self.active -= 1
            if holds_id:
                self._client_ids.discard(rid)
            if submitted and not finished:
                # Cancelled, past its deadline, or failed: free its KV blocks and slot now, not later.
                # (If the engine refused it, or the add was cancelled before it ran, this is a no-op.)
                self.loop.call(lambda engine: engine.abort(engine_id))
            if lease is not None:
                self.cache.release(lease)
