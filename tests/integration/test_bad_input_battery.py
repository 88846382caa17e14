"""Bad input on every RPC of all four services and health: each gets its documented status.

Requests go out as raw bytes over plain channels, so a case can be anything a hostile or buggy
client could send: out-of-range, empty, huge (over the 8 MiB limit), unicode, bytes that are not
a message at all, or a message of another type. For each one: the status and reason are the
documented ones (never INTERNAL or UNKNOWN), a good call succeeds right after, and the registry
listing, the artifact store and the data plane's caches are what they were before.
"""

from __future__ import annotations

import base64
import collections
import functools
import json
import os
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplane.errors import DOMAIN, REASON_CODES, reason_value
from loraplane.grpc_server import MAX_MESSAGE_BYTES
from loraplane.v1 import cache_service_pb2 as cache_pb2
from loraplane.v1 import distribution_service_pb2 as dist_pb2
from loraplane.v1 import generation_service_pb2 as gen_pb2
from loraplane.v1 import registry_service_pb2 as reg_pb2
from tests.integration.dp_helpers import wait_for
from tests.servers import RunningControlPlane, RunningDataPlane

S = grpc.StatusCode
ADMIN = "battery-admin-token"
DP_ADMIN = "battery-dp-admin-token"
HUGE = "x" * (MAX_MESSAGE_BYTES + (1 << 20))  # over the server's receive limit
BIG = "y" * (1 << 20)  # under it: reaches our validation
UNICODE = ["ädapter", "名前", "🙂", "a\u200bb", "\u202eevil", "x\u0301", "a\x00b", "a\nb"]
GHOST_VERSION = "sha256:" + "0" * 64
REG, DIST = "/loraplane.v1.AdapterRegistryService/", "/loraplane.v1.AdapterDistributionService/"
GEN, CACHE = "/loraplane.v1.GenerationService/", "/loraplane.v1.AdapterCacheService/"
HEALTH = "/grpc.health.v1.Health/"
STREAMING = {REG + "WatchAdapters", DIST + "FetchAdapter", GEN + "Generate", HEALTH + "Watch"}
# Where gRPC itself answers, there is no ErrorInfo: the status is gRPC's documented one.
GRPC_LEVEL = object()
TRIED: collections.Counter = collections.Counter()


@dataclass
class Outcome:
    code: grpc.StatusCode
    reason: str | None
    details: str
    messages: int


@pytest.fixture(scope="module")
def planes(base_model, good_adapter, adapter_root, redis_url, tmp_path_factory):
    """One control plane and one data plane for the whole battery, with one READY adapter."""
    import uuid

    from control_plane.config import ControlPlaneConfig
    from data_plane.server.config import DataPlaneConfig

    tmp = tmp_path_factory.mktemp("battery")
    prefix = f"lptest-battery-{uuid.uuid4().hex[:8]}"
    # Remote sources point at a closed port so a well-formed hf:// or s3:// URI fails fast, offline.
    cp = RunningControlPlane(ControlPlaneConfig(
        base_model=str(base_model), listen="127.0.0.1:0", redis_url=redis_url, redis_prefix=prefix,
        data_dir=tmp / "cp", allowed_roots=(adapter_root,), admin_token=ADMIN, grace_period_s=1.0,
        hf_endpoint="http://127.0.0.1:9", s3_endpoint_url="http://127.0.0.1:9", s3_anon=True, source_timeout_s=5))
    dp = None
    try:
        with cp.client() as c:
            existing = c.create_adapter("existing", str(good_adapter), wait=True)
            c.create_adapter("pinned-one", str(good_adapter), wait=True, pinned=True)
        dp = RunningDataPlane(DataPlaneConfig(
            model=str(base_model), control_plane=cp.address, listen="127.0.0.1:0", redis_url=redis_url,
            redis_prefix=prefix, max_loras=2, max_cpu_loras=2, max_lora_rank=16, max_model_len=128,
            max_num_seqs=4, device="cpu", disk_cache_dir=tmp / "disk", admin_token=DP_ADMIN,
            grace_period_s=1.0, fetch_timeout_s=5.0, fetch_retries=1, replica_id="battery"))
        with dp.client() as c:
            list(c.generate([1, 2, 3], "existing", max_tokens=2))  # cached, so the cache listing has content
        yield cp, dp, existing
    finally:
        if dp is not None:
            dp.stop()
        cp.stop()
        _report()


def _report() -> None:
    summary = dict(sorted(TRIED.items()))
    print(f"\nbad inputs tried per service: {summary} (total {sum(TRIED.values())})")
    out = os.environ.get("LORAPLANE_RELIABILITY_OUT")
    if out:
        with open(os.path.join(out, "bad_inputs.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f)


def call_raw(address: str, method: str, payload: bytes, metadata=(), timeout: float = 20.0) -> Outcome:
    """Send `payload` as the request bytes of `method`; returns what came back."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options) as channel:
        ident = lambda b: b  # noqa: E731 - the bytes go out exactly as given
        messages = 0
        try:
            if method in STREAMING:
                call = channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)(
                    payload, metadata=metadata, timeout=timeout)
                for _ in call:
                    messages += 1
                    if method == HEALTH + "Watch":  # an endless stream: its first answer is the verdict
                        call.cancel()
                        return Outcome(S.OK, None, "", messages)
            else:
                channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)(
                    payload, metadata=metadata, timeout=timeout)
                messages = 1
            return Outcome(S.OK, None, "", messages)
        except grpc.RpcError as e:
            return Outcome(e.code(), _reason(e), e.details() or "", messages)


def _reason(error: grpc.RpcError) -> str | None:
    status = rpc_status.from_call(error)
    if status is None:
        return None
    from google.rpc import error_details_pb2

    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, f"exactly one ErrorInfo expected, got {len(infos)}"
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == DOMAIN
    return info.reason


def check_contract(out: Outcome, method: str) -> None:
    """What holds for any answer at all: no INTERNAL/UNKNOWN, and a reason that fits its code."""
    assert out.code not in (S.INTERNAL, S.UNKNOWN), f"{method}: {out.code.name} {out.details[:300]}"
    assert "Traceback" not in out.details
    if out.reason is not None:
        assert REASON_CODES[reason_value(out.reason)] == out.code, (method, out.reason, out.code)
    elif out.code != S.OK:
        # Only gRPC's own refusals come without ErrorInfo.
        assert out.code in (S.RESOURCE_EXHAUSTED, S.DEADLINE_EXCEEDED, S.NOT_FOUND, S.UNIMPLEMENTED), \
            (method, out.code, out.details[:300])


def snapshot(cp, dp) -> tuple:
    with cp.client(ADMIN) as c:
        listing = [(a.name, a.etag, a.state, a.pinned, a.version) for a in c.list_adapters()]
    store = sorted(p.name for p in cp.config.artifact_dir.iterdir() if not p.name.startswith("."))
    with dp.client(DP_ADMIN) as c:
        cached = sorted((a.name, a.version, tuple(a.tiers), a.pinned) for a in c.list_cached_adapters().adapters)
    return listing, store, cached


def still_serving(cp, dp, generate: bool = False) -> None:
    with cp.client(ADMIN) as c:
        assert c.get_adapter("existing").state == 4
        assert c.resolve_adapter("existing").name == "existing"
    with dp.client(timeout=20) as c:
        assert c.get_model_info().vocab_size == 320
        if generate:  # the engine thread is still stepping, not just the gRPC server answering
            assert c.generate_text([1, 2], max_tokens=1)[1].usage.completion_tokens == 1


# ---- the cases ---------------------------------------------------------------------------------

@dataclass
class Case:
    service: str
    method: str
    label: str
    payload: bytes | Message
    code: grpc.StatusCode
    reason: object = None  # a reason name, GRPC_LEVEL, or None when OK
    token: str | None = None
    timeout: float = 20.0

    @property
    def id(self) -> str:
        return f"{self.method.rsplit('/', 1)[1]}-{self.label}"


def _bad_names(make, field_code=S.INVALID_ARGUMENT, reason="INVALID_NAME"):
    cases = [("empty", ""), ("slash", "a/b"), ("dotdot", "../etc"), ("dot", "."), ("long", "x" * 129),
             ("space", "a b"), ("lead-dash", "-a"), ("big", BIG)]
    cases += [(f"unicode{i}", u) for i, u in enumerate(UNICODE)]
    return [(f"name-{label}", make(value), field_code, reason) for label, value in cases]


def _garbage(service: str, method: str, token=None, other: Message | None = None,
             field1_is_string: bool = True) -> list[Case]:
    """Bytes no parser accepts, a message of another type, and one over the size limit."""
    IA = (S.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    blobs = [("garbage-ff", b"\xff" * 16, IA), ("garbage-truncated-varint", b"\x08\xff\xff", IA),
             ("garbage-wrong-wiretype-len", b"\x0a\xff\xff\xff\xff\x0f", IA),
             # Invalid UTF-8 is refused in a string field; where field 1 is a number it is an unknown field.
             ("garbage-bad-utf8", b"\x0a\x02\xc3\x28", IA if field1_is_string else (S.OK, None))]
    cases = [Case(service, method, label, blob, code, reason, token) for label, blob, (code, reason) in blobs]
    cases.append(Case(service, method, "over-8MiB", HUGE_FIELD1, S.RESOURCE_EXHAUSTED, GRPC_LEVEL, token))
    if other is not None:
        cases.append(Case(service, method, f"other-type-{type(other).__name__}", other, S.INVALID_ARGUMENT,
                          "ANY", token))
    return cases


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# Field 1 as a 9 MiB string: over the limit whatever the method's message is. One shared copy.
HUGE_FIELD1 = b"\x0a" + _varint(len(HUGE)) + HUGE.encode()


def registry_cases(good_source: str) -> list[Case]:
    cases: list[Case] = []
    R = "registry"

    def create(**kw):
        return reg_pb2.CreateAdapterRequest(**{"name": "newcomer", "source": good_source, "wait": True, **kw})

    m = REG + "CreateAdapter"
    for label, req, code, reason in _bad_names(lambda v: create(name=v)):
        cases.append(Case(R, m, label, req, code, reason, ADMIN))
    sources = [("empty", "", "INVALID_SOURCE"), ("relative", "rel/path", "INVALID_SOURCE"),
               ("ftp", "ftp://host/x", "INVALID_SOURCE"), ("nul", "/tmp/a\x00b", "INVALID_SOURCE"),
               ("newline", "/tmp/a\nb", "INVALID_SOURCE"), ("too-long", "/" + "a" * 1100, "INVALID_SOURCE"),
               ("big", "/" + BIG, "INVALID_SOURCE"), ("root", "/", "SOURCE_NOT_ALLOWED"),
               ("etc", "/etc", "SOURCE_NOT_ALLOWED"), ("dotdot", good_source + "/../../../../etc", "SOURCE_NOT_ALLOWED"),
               ("file-host", "file://evil.example/x", "INVALID_SOURCE"),
               ("file-bad-percent", "file:///tmp/%ff%fe", "INVALID_SOURCE"),
               ("file-encoded-dotdot", "file://" + good_source + "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc", "SOURCE_NOT_ALLOWED"),
               ("unicode-outside", "/tmp/ünïcødé/🙂", "SOURCE_NOT_ALLOWED"),
               ("missing-inside", good_source + "-does-not-exist", "SOURCE_UNREACHABLE"),
               ("not-a-dir", good_source + "/adapter_config.json", "INVALID_SOURCE"),
               ("hf-bad", "hf://only-one-part", "INVALID_SOURCE"), ("hf-dots", "hf://a/b..c", "INVALID_SOURCE"),
               ("hf-unreachable", "hf://org/name@main", "SOURCE_UNREACHABLE"),
               ("s3-bucket", "s3://UPPER/x", "INVALID_SOURCE"), ("s3-dotdot", "s3://bucket/../x", "INVALID_SOURCE"),
               ("s3-glob", "s3://bucket/a*b", "INVALID_SOURCE"), ("s3-ip", "s3://10.0.0.1/x", "INVALID_SOURCE"),
               ("s3-unreachable", "s3://some-bucket/prefix", "SOURCE_UNREACHABLE")]
    for label, src, reason in sources:
        code = REASON_CODES[reason_value(reason)]
        cases.append(Case(R, m, f"source-{label}", create(source=src), code, reason, ADMIN))
    revisions = [("on-local", good_source, "main"), ("bad-chars", "hf://org/name", "a b"),
                 ("dotdot", "hf://org/name", "../x"), ("unicode", "hf://org/name", "ränch"),
                 ("big", "hf://org/name", BIG), ("lock", "hf://org/name", "main.lock")]
    for label, src, rev in revisions:
        cases.append(Case(R, m, f"revision-{label}", create(source=src, revision=rev), S.INVALID_ARGUMENT,
                          "INVALID_SOURCE", ADMIN))
    for label, base in (("other", "meta-llama/Llama-3-8B"), ("unicode", "模型"), ("big", BIG)):
        cases.append(Case(R, m, f"base_model-{label}", create(base_model=base), S.FAILED_PRECONDITION,
                          "ADAPTER_INCOMPATIBLE", ADMIN))
    cases.append(Case(R, m, "name-duplicate", create(name="existing"), S.ALREADY_EXISTS, "ADAPTER_ALREADY_EXISTS",
                      ADMIN))
    cases.append(Case(R, m, "empty-message", reg_pb2.CreateAdapterRequest(), S.INVALID_ARGUMENT, "INVALID_NAME", ADMIN))
    cases += _garbage(R, m, ADMIN, gen_pb2.GenerateRequest(request_id="\u00e9" * 3, prompt="hi"))

    m = REG + "GetAdapter"
    for label, req, code, reason in _bad_names(lambda v: reg_pb2.GetAdapterRequest(name=v)):
        cases.append(Case(R, m, label, req, code, reason, ADMIN))
    cases.append(Case(R, m, "name-ghost", reg_pb2.GetAdapterRequest(name="ghost"), S.NOT_FOUND, "ADAPTER_NOT_FOUND",
                      ADMIN))
    cases += _garbage(R, m, ADMIN, dist_pb2.FetchAdapterRequest(name="x", version="v", offset=5))

    m = REG + "ListAdapters"
    for size in (-1, 1001, 2**31 - 1, -(2**31)):
        cases.append(Case(R, m, f"page_size-{size}", reg_pb2.ListAdaptersRequest(page_size=size),
                          S.INVALID_ARGUMENT, "INVALID_ARGUMENT", ADMIN))
    for state in (6, 99, -1, 2**31 - 1):
        cases.append(Case(R, m, f"state_filter-{state}", reg_pb2.ListAdaptersRequest(state_filter=state),
                          S.INVALID_ARGUMENT, "INVALID_ARGUMENT", ADMIN))
    tok = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    tokens = [("garbage", "!!!not-base64!!!"), ("unicode", "ünï🙂"), ("big", BIG), ("b64-not-json", "aGVsbG8"),
              ("json-list", tok([1, 2])), ("wrong-type", tok({"a": 5, "f": ""})),
              ("other-filter", tok({"a": "existing", "f": "READY"})), ("nul", "\x00"), ("padding", "====")]
    for label, value in tokens:
        cases.append(Case(R, m, f"page_token-{label}", reg_pb2.ListAdaptersRequest(page_token=value),
                          S.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", ADMIN))
    cases += _garbage(R, m, ADMIN, field1_is_string=False)
    # A DeleteAdapterRequest's etag lands in ListAdaptersRequest's page_token: not a token of ours.
    cases.append(Case(R, m, "other-type-DeleteAdapterRequest", reg_pb2.DeleteAdapterRequest(name="x", etag="existing"),
                      S.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", ADMIN))

    for verb, req_cls in (("DeleteAdapter", reg_pb2.DeleteAdapterRequest), ("PinAdapter", reg_pb2.PinAdapterRequest),
                          ("UnpinAdapter", reg_pb2.UnpinAdapterRequest)):
        m = REG + verb
        for label, req, code, reason in _bad_names(lambda v, c=req_cls: c(name=v)):
            cases.append(Case(R, m, label, req, code, reason, ADMIN))
        cases.append(Case(R, m, "name-ghost", req_cls(name="ghost"), S.NOT_FOUND, "ADAPTER_NOT_FOUND", ADMIN))
        for label, etag in (("stale", "1-1"), ("unicode", "é-🙂"), ("big", BIG), ("negative", "-1--1")):
            target = "pinned-one" if verb == "UnpinAdapter" else "existing"
            cases.append(Case(R, m, f"etag-{label}", req_cls(name=target, etag=etag), S.ABORTED, "ETAG_MISMATCH",
                              ADMIN))
        cases += _garbage(R, m, ADMIN, reg_pb2.ListAdaptersRequest(page_size=7))
    cases.append(Case(R, REG + "DeleteAdapter", "name-pinned", reg_pb2.DeleteAdapterRequest(name="pinned-one"),
                      S.FAILED_PRECONDITION, "ADAPTER_PINNED", ADMIN))

    m = REG + "WatchAdapters"
    for label, value in (("letters", "abc"), ("negative", "-1"), ("three-parts", "1-2-3"), ("unicode", "١٢٣-٠"),
                         ("big", BIG), ("overflow-ms", "9" * 25 + "-0"), ("overflow-seq", "1-" + "9" * 25),
                         ("space", "1 -0"), ("plus", "+1-0"), ("dollar", "$"), ("gt", ">")):
        cases.append(Case(R, m, f"after_event_id-{label}", reg_pb2.WatchAdaptersRequest(after_event_id=value),
                          S.INVALID_ARGUMENT, "INVALID_ARGUMENT", ADMIN))
    # Garbage on a stream: a valid-looking id parsed from another type's bytes just watches (deadline).
    cases += _garbage(R, m, ADMIN)
    return cases


def distribution_cases(existing_version: str) -> list[Case]:
    cases: list[Case] = []
    D = "distribution"
    m = DIST + "ResolveAdapter"
    for label, req, code, reason in _bad_names(lambda v: dist_pb2.ResolveAdapterRequest(name=v)):
        cases.append(Case(D, m, label, req, code, reason))
    for label, ref, code, reason in (
            ("ghost", "ghost", S.NOT_FOUND, "ADAPTER_NOT_FOUND"),
            ("ghost-version", f"existing@{GHOST_VERSION}", S.NOT_FOUND, "ADAPTER_NOT_FOUND"),
            ("version-latest", "existing@latest", S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("version-upper", "existing@sha256:" + "A" * 64, S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("version-empty", "existing@", S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("version-traversal", "existing@sha256:../../etc/passwd", S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("version-unicode", "existing@sha256:" + "é" * 64, S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("two-ats", f"existing@{existing_version}@x", S.INVALID_ARGUMENT, "INVALID_ARGUMENT")):
        cases.append(Case(D, m, f"ref-{label}", dist_pb2.ResolveAdapterRequest(name=ref), code, reason))
    cases += _garbage(D, m, other=gen_pb2.GenerateRequest(adapter="existing", prompt="x"))

    m = DIST + "FetchAdapter"
    fetch = lambda **kw: dist_pb2.FetchAdapterRequest(**{"name": "existing", "version": existing_version, **kw})  # noqa: E731
    for label, req, code, reason in _bad_names(lambda v: fetch(name=v)):
        cases.append(Case(D, m, label, req, code, reason))
    cases.append(Case(D, m, "name-ghost", fetch(name="ghost"), S.NOT_FOUND, "ADAPTER_NOT_FOUND"))
    for label, version, code, reason in (
            ("empty", "", S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("ghost", GHOST_VERSION, S.NOT_FOUND, "ADAPTER_NOT_FOUND"),
            ("md5", "md5:abc", S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("traversal", "sha256:../../../../etc/passwd", S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("short", "sha256:abc", S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("unicode", "sha256:" + "é" * 64, S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("big", BIG, S.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
            ("with-name", f"existing@{existing_version}", S.INVALID_ARGUMENT, "INVALID_ARGUMENT")):
        cases.append(Case(D, m, f"version-{label}", fetch(version=version), code, reason))
    for offset in (-1, 10**9, 2**63 - 1, -(2**63)):
        cases.append(Case(D, m, f"offset-{offset}", fetch(offset=offset), S.INVALID_ARGUMENT, "INVALID_ARGUMENT"))
    cases += _garbage(D, m, other=reg_pb2.CreateAdapterRequest(name="existing", source="/x"))
    return cases


def generation_cases() -> list[Case]:
    cases: list[Case] = []
    G = "generation"
    m = GEN + "Generate"

    def gen(prompt_ids=(1, 2, 3), **kw) -> gen_pb2.GenerateRequest:
        sampling = kw.pop("sampling", {})
        req = gen_pb2.GenerateRequest(prompt_token_ids=list(prompt_ids), **kw)
        req.sampling.max_tokens = 2
        for key, value in sampling.items():
            if isinstance(value, list):
                getattr(req.sampling, key).extend(value)
            else:
                setattr(req.sampling, key, value)
        return req

    IA, INV = S.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    cases += [Case(G, m, "request_id-long", gen(request_id="r" * 257), IA, INV),
              Case(G, m, "request_id-big", gen(request_id=BIG), IA, INV),
              Case(G, m, "request_id-unicode", gen(request_id="ïd-🙂\x00\n"), S.OK)]
    for label, req, code, reason in _bad_names(lambda v: gen(adapter=v)):
        if label == "name-empty":
            continue  # empty means the base model
        cases.append(Case(G, m, label.replace("name", "adapter"), req, code, reason))
    cases += [Case(G, m, "adapter-ghost", gen(adapter="ghost"), S.NOT_FOUND, "ADAPTER_NOT_FOUND"),
              Case(G, m, "adapter-bad-version", gen(adapter="existing@v1"), IA, INV),
              Case(G, m, "adapter-ghost-version", gen(adapter=f"existing@{GHOST_VERSION}"), S.NOT_FOUND,
                   "ADAPTER_NOT_FOUND")]
    cases += [Case(G, m, "prompt-none", gen(prompt_ids=()), IA, INV),
              Case(G, m, "prompt-both", gen(prompt="hi"), IA, INV),
              Case(G, m, "prompt-big-text", gen(prompt_ids=(), prompt="word " * 200_000), S.INVALID_ARGUMENT,
                   "PROMPT_TOO_LONG"),
              Case(G, m, "prompt-too-long", gen(prompt_ids=range(1, 200)), IA, "PROMPT_TOO_LONG"),
              Case(G, m, "prompt-big-ids", gen(prompt_ids=[5] * 1_000_000), IA, "PROMPT_TOO_LONG")]
    for i, text in enumerate(UNICODE + ["\ud7ff\ue000\U0010ffff", "\x00" * 10]):
        cases.append(Case(G, m, f"prompt-unicode{i}", gen(prompt_ids=(), prompt=text), S.OK))
    for value in (-1, 320, 2**31 - 1, -(2**31)):
        cases.append(Case(G, m, f"prompt_token_ids-{value}", gen(prompt_ids=(1, value)), IA, INV))
    sampling_bad = [("max_tokens", 0), ("max_tokens", -1), ("max_tokens", -(2**31)),
                    ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")),
                    ("temperature", float("-inf")),
                    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.5), ("top_p", float("nan")), ("top_p", float("inf")),
                    ("top_k", -1), ("top_k", -(2**31)),
                    ("stop", [""]), ("stop_token_ids", [-1]), ("stop_token_ids", [320]), ("stop_token_ids", [2**31 - 1]),
                    # Checked at every token on the engine thread: bounded (request.py's MAX_STOP_*).
                    ("stop", ["é" * 257]), ("stop", ["s"] * 17), ("stop", ["s"] * 10_000),
                    ("stop_token_ids", [1] * 257)]
    for key, value in sampling_bad:
        label = f"{value[0][:4]}x{len(value[0])}x{len(value)}" if key == "stop" and value[0] else value
        label = f"[1]x{len(value)}" if key == "stop_token_ids" and len(value) > 1 else label
        cases.append(Case(G, m, f"sampling.{key}={label}", gen(sampling={key: value}), IA, INV))
    sampling_ok = [("max_tokens", 2**31 - 1), ("temperature", 1e30), ("temperature", 1e-45), ("top_p", 1e-30),
                   ("top_k", 2**31 - 1), ("seed", -(2**63)), ("seed", 2**63 - 1), ("stop", ["🙂", "\x00", "é" * 256]),
                   ("stop", ["s"] * 16), ("stop_token_ids", [1] * 256)]
    for key, value in sampling_ok:
        label = f"{value[:1]}x{len(value)}" if isinstance(value, list) else value
        cases.append(Case(G, m, f"sampling.{key}={label}-ok", gen(sampling={key: value}), S.OK))
    cases.append(Case(G, m, "empty-message", gen_pb2.GenerateRequest(), IA, INV))
    cases += _garbage(G, m, other=reg_pb2.CreateAdapterRequest(name="n", source="s", revision="r"))

    m = GEN + "GetModelInfo"
    cases += [c for c in _garbage(G, m) if c.label in ("over-8MiB", "garbage-ff", "garbage-truncated-varint")]
    # An empty request type: any bytes that parse are just unknown fields, which proto3 ignores.
    cases.append(Case(G, m, "other-type-GenerateRequest", gen(), S.OK))
    return cases


def cache_cases() -> list[Case]:
    cases: list[Case] = []
    C = "cache"
    m = CACHE + "ListCachedAdapters"
    cases.append(Case(C, m, "other-type-PrefetchAdapterRequest", cache_pb2.PrefetchAdapterRequest(name="x"), S.OK,
                      None, DP_ADMIN))
    cases += [c for c in _garbage(C, m, DP_ADMIN) if c.label in ("over-8MiB", "garbage-ff", "garbage-truncated-varint")]
    for verb, req_cls in (("PrefetchAdapter", cache_pb2.PrefetchAdapterRequest),
                          ("EvictAdapter", cache_pb2.EvictAdapterRequest)):
        m = CACHE + verb
        for label, req, code, reason in _bad_names(lambda v, c=req_cls: c(name=v)):
            cases.append(Case(C, m, label, req, code, reason, DP_ADMIN))
        cases.append(Case(C, m, "name-ghost", req_cls(name="ghost"), S.NOT_FOUND, "ADAPTER_NOT_FOUND", DP_ADMIN))
        for tier in (4, 99, -1, 2**31 - 1):
            cases.append(Case(C, m, f"tier-{tier}", req_cls(name="existing", tier=tier), S.INVALID_ARGUMENT,
                              "INVALID_ARGUMENT", DP_ADMIN))
        cases += _garbage(C, m, DP_ADMIN, gen_pb2.GenerateRequest(prompt="p", adapter="a"))
    return cases


def health_cases() -> list[Case]:
    cases: list[Case] = []
    H = "health"
    for method in (HEALTH + "Check", HEALTH + "Watch"):
        for label, service in (("unknown", "nope"), ("unicode", "sérvice🙂"), ("big", BIG), ("nul", "\x00")):
            req = health_pb2.HealthCheckRequest(service=service)
            if method.endswith("Check"):
                cases.append(Case(H, method, f"service-{label}", req, S.NOT_FOUND, GRPC_LEVEL, timeout=5))
            else:  # Watch answers SERVICE_UNKNOWN as a message, per the health protocol
                cases.append(Case(H, method, f"service-{label}", req, S.OK, timeout=5))
        cases += _garbage(H, method)
    return cases


@functools.lru_cache(maxsize=2)
def all_cases(good_source="/GOOD", version=GHOST_VERSION) -> list[Case]:
    return (registry_cases(good_source) + distribution_cases(version) + generation_cases() + cache_cases()
            + health_cases())


CASE_IDS = [c.id for c in all_cases()]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case ids must be unique"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_bad_input(planes, good_adapter, index):
    cp, dp, existing = planes
    case = all_cases(str(good_adapter), existing.version)[index]
    address = dp.address if case.service in ("generation", "cache") else cp.address
    if case.service == "health":
        address = cp.address if index % 2 else dp.address  # both servers answer health the same way
    payload = case.payload if isinstance(case.payload, bytes) else case.payload.SerializeToString()
    metadata = (("authorization", f"Bearer {case.token}"),) if case.token else ()
    before = snapshot(cp, dp)
    timeout = case.timeout
    if case.method == REG + "WatchAdapters":
        timeout = 3  # a valid request watches forever; only a refusal ends it early
    out = call_raw(address, case.method, payload, metadata, timeout)
    TRIED[case.service] += 1
    check_contract(out, case.id)
    if case.reason != "ANY":  # for another type's bytes, whatever parses gets a documented answer (above)
        expected_reason = None if case.reason is GRPC_LEVEL else case.reason
        assert (out.code, out.reason) == (case.code, expected_reason), f"{case.id}: {out.details[:300]}"
    still_serving(cp, dp, generate=case.service == "generation")
    assert snapshot(cp, dp) == before
    stats = dp.plane.engine_loop.stats
    if case.service == "generation":
        assert wait_for(lambda: dp.plane.generation.active == 0 and dp.plane.engine_loop.stats.running == 0)
        assert dp.plane.engine_loop.stats.kv_usage == 0, stats


def test_duplicate_request_id_never_touches_the_running_request(planes):
    """A second request with an in-flight id is refused, and the first one runs to its end."""
    _, dp, _ = planes
    with dp.client() as first:
        stream = first.generate([1, 2, 3], "existing", request_id="shared-id", max_tokens=60, ignore_eos=True)
        head = next(stream)
        for bad in (dict(max_tokens=2), dict(max_tokens=0), dict(temperature=-1.0)):
            out = call_raw(dp.address, GEN + "Generate", gen_pb2.GenerateRequest(
                request_id="shared-id", prompt_token_ids=[4, 5], sampling=gen_pb2.SamplingParams(**bad))
                .SerializeToString())
            assert (out.code, out.reason) == (S.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        rest = list(stream)
    assert rest[-1].finish_reason == gen_pb2.FINISH_REASON_LENGTH
    assert len(head.token_ids) + sum(len(m.token_ids) for m in rest) == 60


# ---- property tests through the full RPC path ---------------------------------------------------

_URI = st.one_of(
    st.text(max_size=80),
    st.tuples(st.sampled_from(["/", "file://", "file:///", "hf://", "s3://", "HF://", "file://localhost/"]),
              st.text(alphabet=st.characters(codec="utf-8"), max_size=60)).map("".join),
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=_URI, revision=st.one_of(st.just(""), st.text(max_size=20)))
def test_any_source_uri_gets_a_documented_answer(planes, source, revision):
    cp, _, _ = planes
    req = reg_pb2.CreateAdapterRequest(name="fuzzed", source=source, revision=revision, wait=True)
    out = call_raw(cp.address, REG + "CreateAdapter", req.SerializeToString(), (("authorization", f"Bearer {ADMIN}"),))
    TRIED["registry: fuzzed source URIs"] += 1
    check_contract(out, "CreateAdapter")
    assert out.code != S.OK  # nothing fuzzed is a valid adapter directory
    assert out.reason in ("INVALID_SOURCE", "SOURCE_NOT_ALLOWED", "SOURCE_UNREACHABLE", "INVALID_ADAPTER_CONFIG",
                          "UNSAFE_FORMAT"), (source, out.reason, out.details)
    with cp.client(ADMIN) as c:
        assert sorted(a.name for a in c.list_adapters()) == ["existing", "pinned-one"]


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(token=st.one_of(
    st.text(max_size=100),
    st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.dictionaries(st.sampled_from(["a", "f", "x"]), st.one_of(st.text(max_size=10), st.integers(), st.none()),
                    max_size=3).map(lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode())),
    state=st.integers(min_value=0, max_value=5))
def test_any_page_token_gets_a_documented_answer(planes, token, state):
    cp, _, _ = planes
    req = reg_pb2.ListAdaptersRequest(page_size=1, page_token=token, state_filter=state)
    out = call_raw(cp.address, REG + "ListAdapters", req.SerializeToString(), (("authorization", f"Bearer {ADMIN}"),))
    TRIED["registry: fuzzed page tokens"] += 1
    check_contract(out, "ListAdapters")
    assert out.code == S.OK or (out.code, out.reason) == (S.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"), out.details
