"""Bearer-token auth for gRPC servers, and where tokens come from."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

import grpc

from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

AUTH_HEADER = "authorization"


def load_token(value: str | None = None, env_var: str | None = None, file: str | Path | None = None) -> str | None:
    """A token from a flag value, else a file (first line, trimmed), else an env var: a flag given on
    the command line wins over an exported variable left over in the shell."""
    if value:
        return value
    if file:
        token = Path(file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"token file {file} is empty")
        return token
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    return None


def check_token(token: str, what: str = "a bearer token") -> str:
    """A usable bearer token, or ValueError: an empty one would let an empty header through, and
    anything outside visible ASCII cannot travel in a gRPC header (grpc fails the call with INTERNAL)."""
    if not token:
        raise ValueError(f"{what} must not be empty")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(f"{what} must be visible ASCII characters only (no spaces, newlines or "
                         "non-ASCII); check the flag, env var or file it came from")
    return token


def bearer(token: str) -> tuple[tuple[str, str]]:
    return ((AUTH_HEADER, f"Bearer {check_token(token)}"),)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method of the given services.

    The check happens before the handler runs, so a refused call changes nothing.
    """

    def __init__(self, tokens_by_service: dict[str, Iterable[str]]):
        # service full name -> accepted tokens; services not listed are open.
        self._tokens = {svc: [check_token(t).encode() for t in toks] for svc, toks in tokens_by_service.items() if toks}

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        service = details.method.rsplit("/", 1)[0].lstrip("/")
        accepted = self._tokens.get(service)
        handler = await continuation(details)
        if not accepted or handler is None:
            return handler
        sent = dict(details.invocation_metadata or ()).get(AUTH_HEADER, "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(token.encode(), t) for t in accepted):
            return handler
        error = LoraplaneError(R.ERROR_REASON_UNAUTHENTICATED,
                               "missing or wrong bearer token" if sent else "this method needs a bearer token")
        return _refusing_handler(handler, error)


def _refusing_handler(handler: grpc.RpcMethodHandler, error: LoraplaneError) -> grpc.RpcMethodHandler:
    status = error.to_status()

    async def unary(request, context):
        await context.abort_with_status(status)

    async def streaming(request, context):
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
