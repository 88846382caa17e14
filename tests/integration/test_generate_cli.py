"""`loraplane generate` against a real control plane, Redis and data plane: what it sends (no admin
token unless asked) and its defaults (the API's max_tokens).

The data plane is reached through a pass-through gRPC tap that forwards every call to it unchanged
and records the metadata that arrived, so the test sees what went over the wire."""

from __future__ import annotations

import contextlib
import json
from concurrent import futures

import grpc
import pytest

from loraplane.cli import build_parser, main
from loraplane.v1 import generation_service_pb2 as gen_pb2

ADMIN_SECRET = "control-plane-admin-secret"


class _Tap(grpc.GenericRpcHandler):
    """Forwards unary-stream calls (Generate) as raw bytes to `upstream`, recording the metadata."""

    def __init__(self, upstream: str):
        self.channel = grpc.insecure_channel(upstream)
        self.seen: list[tuple[str, dict[str, str]]] = []

    def service(self, details):
        method, metadata = details.method, dict(details.invocation_metadata or ())
        self.seen.append((method, metadata))
        forward = self.channel.unary_stream(method)  # no (de)serializers: bytes pass through

        def handler(request: bytes, context):
            yield from forward(request, timeout=context.time_remaining())

        return grpc.unary_stream_rpc_method_handler(handler)


@contextlib.contextmanager
def tapped(upstream: str):
    tap = _Tap(upstream)
    server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[tap])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", tap
    finally:
        server.stop(0)
        tap.channel.close()


@pytest.fixture
def dp(cp_factory, dp_factory):
    cp = cp_factory(admin_token=ADMIN_SECRET)
    return dp_factory(cp.address)


def _generate(capsys, *argv: str) -> list[dict]:
    assert main(["generate", *argv, "--ignore-eos", "--json", "hi"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_generate_sends_no_admin_token_unless_given_one(dp, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLANE_ADMIN_TOKEN", ADMIN_SECRET)
    with tapped(dp.address) as (address, tap):
        out = _generate(capsys, "--address", address, "--max-tokens", "3")
        assert out[-1]["usage"]["completion_tokens"] == 3  # it did reach the data plane
        [(method, metadata)] = tap.seen
        assert method == "/loraplane.v1.GenerationService/Generate"
        assert "authorization" not in metadata, "the control plane's admin token leaked to the data plane"
        assert ADMIN_SECRET not in json.dumps(metadata)

        # An explicit token (say, for a gateway in front of the data plane) is still sent.
        _generate(capsys, "--address", address, "--max-tokens", "2", "--token", "gateway-token")
        assert tap.seen[-1][1].get("authorization") == "Bearer gateway-token"
        (tmp_path / "token").write_text("file-token\n")
        _generate(capsys, "--address", address, "--max-tokens", "2", "--token-file", str(tmp_path / "token"))
        assert tap.seen[-1][1].get("authorization") == "Bearer file-token"


def test_generate_leaves_max_tokens_to_the_api_default(dp, capsys, monkeypatch):
    monkeypatch.delenv("LORAPLANE_ADMIN_TOKEN", raising=False)
    out = _generate(capsys, "--address", dp.address)
    last = out[-1]
    assert last["finish_reason"] == gen_pb2.FinishReason.Name(gen_pb2.FINISH_REASON_LENGTH)
    assert last["usage"]["completion_tokens"] == 16  # generation_service.proto: "Unset means 16"
    assert build_parser().parse_args(["generate", "hi"]).max_tokens in (None, 16)


def test_generate_help_shows_the_max_tokens_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    option = help_text[help_text.index("--max-tokens MAX_TOKENS "):]  # the option's line, not the usage's
    assert "default" in option[:120] and "16" in option[:120], option[:120]


class _WantsToken(grpc.GenericRpcHandler):
    """A gateway in front of a data plane that requires a bearer token it was not given."""

    def service(self, details):
        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bearer token required")

        return grpc.unary_stream_rpc_method_handler(refuse)


def test_an_unauthenticated_generate_hints_at_its_own_token_flags(capsys):
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[_WantsToken()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert main(["generate", "--address", f"127.0.0.1:{port}", "hi"]) == 2
    finally:
        server.stop(0)
    err = capsys.readouterr().err
    # generate reads no token env var: the admin-token hint would send the user the wrong way.
    assert "hint:" in err and "--token" in err and "LORAPLANE_ADMIN_TOKEN" not in err
