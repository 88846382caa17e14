"""Authentication on every admin RPC, what a data plane may fetch, where local sources may come
from, no pickle anywhere in the code, and no secret in any log."""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis

from loraplane.client import Client
from loraplane.embedded_redis import free_port
from loraplane.errors import LoraplaneError
from loraplane.v1 import distribution_service_pb2 as dist_pb2
from loraplane.v1 import registry_service_pb2 as reg_pb2
from loraplane.v1 import registry_service_pb2_grpc as reg_grpc

S = grpc.StatusCode
REPO = Path(__file__).resolve().parents[2]
ADMIN = "test-admin-token"  # cp_factory's
DIST_TOKEN = "distribution-secret-7f3a"
DP_ADMIN = "dp-admin-secret-91bc"


def redis_state(redis_url: str, prefix: str) -> dict:
    """Every key under the prefix with its full value (heartbeats aside: they change on their own)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    state = {}
    for key in sorted(client.scan_iter(f"{prefix}:*")):
        if ":replica:" in key:
            continue
        kind = client.type(key)
        if kind == "hash":
            state[key] = client.hgetall(key)
        elif kind == "zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            state[key] = sorted(client.smembers(key))
        elif kind == "stream":
            state[key] = [eid for eid, _ in client.xrange(key)]
        else:
            state[key] = client.get(key)
    client.close()
    return state


def store_state(cp) -> list[str]:
    return sorted(str(p.relative_to(cp.config.artifact_dir)) for p in cp.config.artifact_dir.rglob("*")
                  if ".tmp" not in p.parts)


def expect(call, code, reason):
    with pytest.raises(LoraplaneError) as e:
        call()
    assert (e.value.code, e.value.reason_name) == (code, reason), e.value
    return e.value


# Every way to not be the admin: nothing, wrong, near misses, another scheme, another service's token.
BAD_AUTH = [
    (), (("authorization", "Bearer wrong-token"),), (("authorization", f"Bearer {ADMIN}x"),),
    (("authorization", f"Bearer {ADMIN[:-1]}"),), (("authorization", f"Basic {ADMIN}"),),
    (("authorization", ADMIN),), (("authorization", "Bearer "),), (("authorization", f"Bearer  {ADMIN}"),),
    (("authorization", f"Bearer {ADMIN.upper()}"),), (("x-api-key", ADMIN),),
    (("authorization", f"Bearer {DIST_TOKEN}"),), (("authorization", f"Bearer {DP_ADMIN}"),),
]


@pytest.fixture
def guarded(cp_factory, good_adapter):
    """A control plane with a distribution token, one READY adapter and one pinned one."""
    cp = cp_factory(distribution_token=DIST_TOKEN)
    with cp.client() as c:
        c.create_adapter("existing", str(good_adapter), wait=True)
        c.create_adapter("pinned", str(good_adapter), wait=True, pinned=True)
    return cp


def test_every_registry_rpc_refuses_bad_credentials_and_changes_nothing(guarded, good_adapter, redis_url,
                                                                        redis_prefix):
    cp = guarded
    with cp.client() as c:
        existing = c.get_adapter("existing")
    # Each would change the registry (or leak it) if it were let through.
    calls = {
        "CreateAdapter": reg_pb2.CreateAdapterRequest(name="intruder", source=str(good_adapter), wait=True),
        "GetAdapter": reg_pb2.GetAdapterRequest(name="existing"),
        "ListAdapters": reg_pb2.ListAdaptersRequest(),
        "DeleteAdapter": reg_pb2.DeleteAdapterRequest(name="existing", etag=existing.etag),
        "PinAdapter": reg_pb2.PinAdapterRequest(name="existing"),
        "UnpinAdapter": reg_pb2.UnpinAdapterRequest(name="pinned"),
        "WatchAdapters": reg_pb2.WatchAdaptersRequest(after_event_id="0"),
    }
    before = redis_state(redis_url, redis_prefix), store_state(cp)
    with grpc.insecure_channel(cp.address) as channel:
        for method, request in calls.items():
            path = f"/loraplane.v1.AdapterRegistryService/{method}"
            streaming = method == "WatchAdapters"
            rpc = (channel.unary_stream if streaming else channel.unary_unary)(
                path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b)
            for metadata in BAD_AUTH:
                with pytest.raises(grpc.RpcError) as e:
                    result = rpc(request, metadata=metadata, timeout=10)
                    if streaming:
                        next(iter(result))
                err = LoraplaneError.from_rpc_error(e.value)
                assert (err.code, err.reason_name) == (S.UNAUTHENTICATED, "UNAUTHENTICATED"), (method, metadata, err)
    assert (redis_state(redis_url, redis_prefix), store_state(cp)) == before
    with cp.client() as c:  # the right token still works on all of them
        assert c.get_adapter("existing").etag == existing.etag


def test_distribution_needs_its_token_and_cannot_administer(guarded):
    cp = guarded
    with Client(cp.address, DIST_TOKEN) as c:
        version = c.resolve_adapter("existing").version
        assert c.fetch_adapter("existing", version)
        expect(lambda: c.list_adapters_page(), S.UNAUTHENTICATED, "UNAUTHENTICATED")  # no admin with it
        expect(lambda: c.delete_adapter("existing"), S.UNAUTHENTICATED, "UNAUTHENTICATED")
    for token in (None, "wrong", DP_ADMIN):
        with Client(cp.address, token) as c:
            expect(lambda c=c: c.resolve_adapter("existing"), S.UNAUTHENTICATED, "UNAUTHENTICATED")
            expect(lambda c=c: c.fetch_adapter("existing", version), S.UNAUTHENTICATED, "UNAUTHENTICATED")


def test_a_data_plane_with_the_wrong_distribution_token_does_not_blame_its_caller(guarded, dp_factory, caplog):
    """The control plane's UNAUTHENTICATED concerns this replica's token, not the Generate caller's
    (Generate needs none): the caller gets CONTROL_PLANE_UNAVAILABLE, and the log says what to fix."""
    dp = dp_factory(guarded.address, distribution_token="not-the-distribution-token")
    with dp.client() as c:
        with pytest.raises(LoraplaneError) as e:
            list(c.generate([1, 2, 3], "existing", max_tokens=2))
    assert e.value.code == S.UNAVAILABLE and e.value.reason_name == "CONTROL_PLANE_UNAVAILABLE"
    assert "--distribution-token" in caplog.text and "not-the-distribution-token" not in caplog.text


def test_data_plane_cache_service_needs_the_admin_token(guarded, dp_factory):
    cp = guarded
    dp = dp_factory(cp.address, admin_token=DP_ADMIN, distribution_token=DIST_TOKEN)
    with dp.client(DP_ADMIN) as admin:
        admin.prefetch_adapter("existing")
        # The pinned adapter arrives on its own (registry events): let that settle before comparing.
        deadline = time.monotonic() + 20
        while not any(a.name == "pinned" and a.pinned and 1 in a.tiers  # GPU: placed last
                      for a in admin.list_cached_adapters().adapters):
            assert time.monotonic() < deadline, "the pinned adapter never arrived"
            time.sleep(0.05)
        before = sorted((a.name, tuple(a.tiers)) for a in admin.list_cached_adapters().adapters)
    fetches = dp.plane.fetcher.fetches
    for token in (None, "wrong", ADMIN, DIST_TOKEN):
        with dp.client(token) as c:
            for call in (lambda c=c: c.list_cached_adapters(), lambda c=c: c.prefetch_adapter("pinned", 2),
                         lambda c=c: c.evict_adapter("existing"), lambda c=c: c.prefetch_adapter("existing", 1)):
                expect(call, S.UNAUTHENTICATED, "UNAUTHENTICATED")
            # Generation is the public API: it needs no token.
            assert c.generate_text([1, 2, 3], max_tokens=2)[1].usage.completion_tokens == 2
    assert dp.plane.fetcher.fetches == fetches
    with dp.client(DP_ADMIN) as admin:
        assert sorted((a.name, tuple(a.tiers)) for a in admin.list_cached_adapters().adapters) == before


def test_only_registered_ready_digest_matching_artifacts_are_served(guarded, dp_factory, adapter_root, good_adapter):
    from control_plane.artifact_store import ArtifactStore

    cp = guarded
    with cp.client() as c:
        version = c.get_adapter("existing").version
        # FAILED: registered without waiting, from a directory that does not exist.
        c.create_adapter("broken", str(adapter_root / "no-such-adapter"))
        deadline = time.monotonic() + 20
        while c.get_adapter("broken").state != 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    # An artifact in the store that no adapter references (as if left behind) is not reachable.
    orphan = ArtifactStore(cp.config.artifact_dir).put(b"not an adapter, but in the store")
    with Client(cp.address, DIST_TOKEN) as c:
        nf = (S.NOT_FOUND, "ADAPTER_NOT_FOUND")
        expect(lambda: c.fetch_adapter("existing", orphan), *nf)
        expect(lambda: c.fetch_adapter("ghost", orphan), *nf)
        expect(lambda: c.resolve_adapter(f"existing@{orphan}"), *nf)
        expect(lambda: c.fetch_adapter("broken", version), S.FAILED_PRECONDITION, "ADAPTER_NOT_READY")
        expect(lambda: c.resolve_adapter("broken"), S.FAILED_PRECONDITION, "ADAPTER_NOT_READY")
        # Another adapter's version under this name is not this adapter.
        c2 = Client(cp.address, cp.token)
        other = c2.create_adapter("other", str(_variant(adapter_root, good_adapter)), wait=True).version
        c2.close()
        assert other != version
        expect(lambda: c.fetch_adapter("existing", other), *nf)
        assert c.fetch_adapter("other", other)
    # Tampered on disk (same size, one bit): the control plane refuses it, the data plane never loads it.
    path = cp.config.artifact_dir / version.removeprefix("sha256:") / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with Client(cp.address, DIST_TOKEN) as c:
        expect(lambda: c.fetch_adapter("existing", version), S.DATA_LOSS, "DIGEST_MISMATCH")
    dp = dp_factory(cp.address, distribution_token=DIST_TOKEN)
    with dp.client(timeout=30) as c:
        expect(lambda: c.generate_text([1, 2, 3], "existing", max_tokens=2), S.DATA_LOSS, "DIGEST_MISMATCH")
    assert list(dp.config.disk_cache_dir.iterdir()) == [] and dp.plane.fetcher.fetches == 0


def _variant(root: Path, good: Path) -> Path:
    """The same adapter with another alpha: other bytes, so another version."""
    import json

    path = root / "security-variant"
    if not path.exists():
        shutil.copytree(good, path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": cfg["lora_alpha"] * 2}))
    return path


def test_local_sources_stay_inside_the_allowed_roots(cp_factory, adapter_root, good_adapter, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(good_adapter, outside)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for adapters")
    evil_root = Path(str(adapter_root) + "-evil")  # shares the allowed root's prefix, is not under it
    evil_root.mkdir(exist_ok=True)
    shutil.copytree(good_adapter, evil_root / "adapter", dirs_exist_ok=True)
    cases = adapter_root / "security"
    shutil.rmtree(cases, ignore_errors=True)
    cases.mkdir()
    (cases / "dir-link").symlink_to(outside, target_is_directory=True)
    weights_link = cases / "weights-link"
    shutil.copytree(good_adapter, weights_link)
    (weights_link / "adapter_model.safetensors").unlink()
    (weights_link / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    config_link = cases / "config-link"
    shutil.copytree(good_adapter, config_link)
    (config_link / "adapter_config.json").unlink()
    (config_link / "adapter_config.json").symlink_to(secret)
    (cases / "loop").symlink_to(cases / "loop")
    (cases / "chain-1").symlink_to(cases / "chain-2")
    (cases / "chain-2").symlink_to(outside, target_is_directory=True)
    inner = cases / "inner-link"  # a link that stays inside the root is fine
    inner.symlink_to(good_adapter, target_is_directory=True)

    cp = cp_factory()
    not_allowed = (S.PERMISSION_DENIED, "SOURCE_NOT_ALLOWED")
    with cp.client() as c:
        for source in (outside, cases / "dir-link", weights_link, config_link, cases / "chain-1",
                       evil_root / "adapter", f"{good_adapter}/../../../../{outside.relative_to('/')}",
                       "file://" + str(cases / "dir-link"), "/proc/self/cwd", "/etc"):
            expect(lambda s=source: c.create_adapter("escapee", str(s), wait=True), *not_allowed)
        # A symlink loop inside the root: refused with a documented reason, not an internal error.
        with pytest.raises(LoraplaneError) as e:
            c.create_adapter("loop", str(cases / "loop"), wait=True)
        assert e.value.reason_name in ("SOURCE_NOT_ALLOWED", "INVALID_SOURCE", "SOURCE_UNREACHABLE"), e.value
        assert [a.name for a in c.list_adapters()] == []
        assert c.create_adapter("inner", str(inner), wait=True).state == 4


# ---- no pickle, anywhere -------------------------------------------------------------------------

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "pickletools"}
UNSAFE_CALLS = {("torch", "load"), ("torch.jit", "load"), ("torch.serialization", "load"), ("numpy", "load"),
                ("np", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"), ("torch", "_load")}


def unsafe_uses(path: Path) -> list[str]:
    """Imports of pickle-like modules, torch.load & co., weights_only=False, allow_pickle=True,
    trust_remote_code=True, found in the syntax tree (so strings and comments do not count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{where} from {module} import ...")
            if module in ("torch", "torch.serialization", "numpy") and any(a.name == "load" for a in node.names):
                found.append(f"{where} from {module} import load")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute):
                owner = ast.unparse(func.value)
                if (owner, func.attr) in UNSAFE_CALLS or func.attr in ("read_pickle", "loads") and owner in (
                        "pickle", "dill", "marshal", "cloudpickle"):
                    found.append(f"{where} {owner}.{func.attr}(...)")
            for kw in node.keywords:
                value = kw.value
                if kw.arg == "weights_only" and not (isinstance(value, ast.Constant) and value.value is True):
                    found.append(f"{where} weights_only={ast.unparse(value)}")
                if kw.arg in ("allow_pickle", "trust_remote_code") and not (
                        isinstance(value, ast.Constant) and value.value is False):
                    found.append(f"{where} {kw.arg}={ast.unparse(value)}")
                if kw.arg == "use_safetensors" and isinstance(value, ast.Constant) and value.value is False:
                    found.append(f"{where} use_safetensors=False")
    return found


def test_scanner_finds_what_it_looks_for(tmp_path):
    bad = REPO / "bench" / ".pickle_scan_probe.py"
    bad.write_text("import pickle\nimport torch\nfrom dill import loads\nx = torch.load('f', weights_only=False)\n"
                   "y = np.load('f', allow_pickle=True)\nm = M.from_pretrained('d', trust_remote_code=True)\n")
    try:
        found = " ".join(unsafe_uses(bad))
    finally:
        bad.unlink()
    for needle in ("import pickle", "from dill", "torch.load", "weights_only=False", "np.load", "allow_pickle",
                   "trust_remote_code"):
        assert needle in found, needle


def test_no_pickle_loading_anywhere_in_the_code():
    files = [p for d in ("loraplane", "control_plane", "data_plane", "kernels", "bench")
             for p in (REPO / d).rglob("*.py") if "/v1/" not in str(p)]
    assert len(files) > 30
    found = [hit for path in files for hit in unsafe_uses(path)]
    assert not found, "pickle-capable loading found:\n" + "\n".join(found)


# ---- secrets never reach a log -------------------------------------------------------------------

SECRETS = {
    "admin": "adm1n-s3cret-0f9e8d7c",
    "distribution": "d1str-s3cret-6b5a4938",
    "dp_admin": "dpadm1n-s3cret-2716aa",
    "hf": "hf_s3cretTokenValue5e4d3c2b1a",
    "aws": "AWSs3cretKeyValue0a1b2c3d4e5f",
}


@pytest.mark.slow
def test_tokens_never_appear_in_logs(base_model, adapter_root, good_adapter, redis_url, redis_prefix, tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text(SECRETS["admin"] + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORAPLANE_DISTRIBUTION_TOKEN": SECRETS["distribution"],
           "HF_TOKEN": SECRETS["hf"], "AWS_ACCESS_KEY_ID": "AKIATESTKEYID", "AWS_SECRET_ACCESS_KEY": SECRETS["aws"]}
    env.pop("LORAPLANE_ADMIN_TOKEN", None)
    cp_port, dp_port = free_port(), free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("cp", "dp")}
    procs = []
    try:
        with open(logs["cp"], "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "loraplane.cli", "--log-level", "DEBUG", "control-plane",
                 "--base-model", str(base_model), "--listen", f"127.0.0.1:{cp_port}", "--redis-url", redis_url,
                 "--redis-prefix", redis_prefix, "--data-dir", str(tmp_path / "cp"), "--allowed-root",
                 str(adapter_root), "--admin-token-file", str(token_file), "--hf-endpoint", "http://127.0.0.1:9",
                 "--s3-endpoint-url", "http://127.0.0.1:9", "--grace-period", "1"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        with open(logs["dp"], "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "loraplane.cli", "--log-level", "DEBUG", "data-plane", "--model",
                 str(base_model), "--control-plane", f"127.0.0.1:{cp_port}", "--redis-url", redis_url,
                 "--redis-prefix", redis_prefix, "--listen", f"127.0.0.1:{dp_port}", "--max-loras", "2",
                 "--max-cpu-loras", "2", "--max-lora-rank", "16", "--max-model-len", "128", "--device", "cpu",
                 "--disk-cache-dir", str(tmp_path / "disk"), "--admin-token", SECRETS["dp_admin"],
                 "--grace-period", "1"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        cp_addr, dp_addr = f"127.0.0.1:{cp_port}", f"127.0.0.1:{dp_port}"
        _wait_ready(cp_addr, procs[0], logs["cp"])
        with Client(cp_addr, SECRETS["admin"]) as c:
            c.create_adapter("secretive", str(good_adapter), wait=True)
            for source in ("hf://org/private-model", "s3://private-bucket/adapter"):  # fail, using the secrets
                with pytest.raises(LoraplaneError):
                    c.create_adapter("remote", source, wait=True)
        for token in ("wrong-" + SECRETS["admin"], SECRETS["distribution"] + "x", ""):
            with Client(cp_addr, token or None) as c, pytest.raises(LoraplaneError):
                c.list_adapters_page()
        _wait_ready(dp_addr, procs[1], logs["dp"])
        with Client(dp_addr, SECRETS["dp_admin"]) as c:
            assert c.generate_text([1, 2, 3], "secretive", max_tokens=2)[1].usage.completion_tokens == 2
            c.list_cached_adapters()
        with Client(dp_addr, "wrong-" + SECRETS["dp_admin"]) as c, pytest.raises(LoraplaneError):
            c.list_cached_adapters()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    texts = {name: path.read_text(errors="replace") for name, path in logs.items()}
    assert "control plane stopped" in texts["cp"] and "data plane stopped" in texts["dp"]
    assert "DEBUG" in texts["cp"]  # the most talkative level was really on
    for name, text in texts.items():
        for what, secret in SECRETS.items():
            assert secret not in text, f"the {what} secret is in the {name} log"
            assert secret[:12] not in text, f"a prefix of the {what} secret is in the {name} log"
    dump = repr(redis_state(redis_url, redis_prefix))
    assert not any(secret in dump for secret in SECRETS.values())


def _wait_ready(address: str, proc, log: Path, timeout: float = 90) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{address} never became ready:\n{log.read_text()[-3000:]}")


def test_fetch_request_for_a_path_never_touches_the_filesystem(guarded):
    """Versions are checked as sha256:<64 lowercase hex> before any path is built from them."""
    with grpc.insecure_channel(guarded.address) as channel:
        fetch = channel.unary_stream("/loraplane.v1.AdapterDistributionService/FetchAdapter",
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=dist_pb2.FetchAdapterResponse.FromString)
        for version in ("sha256:" + "../" * 21 + "e", "sha256:/etc/passwd" + "0" * 50, "sha256:" + "0" * 63 + "/",
                        "sha256:" + "0" * 64 + "/../x"):
            with pytest.raises(grpc.RpcError) as e:
                list(fetch(dist_pb2.FetchAdapterRequest(name="existing", version=version),
                           metadata=(("authorization", f"Bearer {DIST_TOKEN}"),), timeout=10))
            err = LoraplaneError.from_rpc_error(e.value)
            assert (err.code, err.reason_name) == (S.INVALID_ARGUMENT, "INVALID_ARGUMENT"), version


def test_a_fifo_planted_as_weights_is_refused_without_blocking(cp, adapter_root, good_adapter):
    """Opening a FIFO for reading waits for a writer: it must not park an ingest worker forever."""
    planted = adapter_root / "security-fifo"
    shutil.rmtree(planted, ignore_errors=True)
    planted.mkdir()
    shutil.copy(good_adapter / "adapter_config.json", planted)
    os.mkfifo(planted / "adapter_model.safetensors")
    t0 = time.monotonic()
    with cp.client(timeout=20) as c:
        expect(lambda: c.create_adapter("fifo", str(planted), wait=True), S.INVALID_ARGUMENT, "INVALID_ADAPTER_CONFIG")
        assert time.monotonic() - t0 < 10
        assert c.create_adapter("after-fifo", str(good_adapter), wait=True).state == 4


@pytest.mark.parametrize("existing", [None, "", " \n"], ids=["no-file", "empty-file", "blank-file"])
def test_a_generated_admin_token_is_never_empty(cp_factory, tmp_path, existing):
    """With no token configured the control plane makes one; an empty file (a crash mid-write, or
    made by hand) must not become an empty token that an empty `Bearer ` header would match."""
    path = tmp_path / "cp" / "admin-token"
    if existing is not None:
        path.parent.mkdir(parents=True)
        path.write_text(existing)
    cp = cp_factory(admin_token=None)
    token = path.read_text().strip()
    assert cp.token == token and len(token) >= 32
    assert path.stat().st_mode & 0o777 == 0o600
    with grpc.insecure_channel(cp.address) as channel:
        stub = reg_grpc.AdapterRegistryServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer "),), (("authorization", "bearer"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.ListAdapters(reg_pb2.ListAdaptersRequest(), metadata=metadata)
            assert e.value.code() == S.UNAUTHENTICATED
    with cp.client() as c:
        assert list(c.list_adapters()) == []
    cp.stop()
    assert cp_factory(admin_token=None).token == token, "a restart keeps the generated token"


@pytest.mark.parametrize("token", ["", "has space", "two\nlines", "caf\u00e9"])
def test_unusable_tokens_are_refused_where_they_are_configured(base_model, tmp_path, token):
    from control_plane.config import ControlPlaneConfig
    from data_plane.server.config import DataPlaneConfig
    from loraplane.auth import BearerTokenInterceptor

    for field in ("admin_token", "distribution_token"):
        with pytest.raises(ValueError, match=field):
            ControlPlaneConfig(base_model=str(base_model), data_dir=tmp_path, **{field: token})
        with pytest.raises(ValueError, match=field):
            DataPlaneConfig(model=str(base_model), control_plane="127.0.0.1:1", **{field: token})
    with pytest.raises(ValueError):
        BearerTokenInterceptor({"loraplane.v1.AdapterRegistryService": [token]})
    with pytest.raises(ValueError, match="bearer token"):
        Client("127.0.0.1:1", token or " ")


def test_control_plane_config_repr_hides_the_redis_password(base_model, tmp_path):
    from control_plane.config import ControlPlaneConfig

    config = ControlPlaneConfig(base_model=str(base_model), data_dir=tmp_path, admin_token="t0k3n-x",
                                redis_url="redis://default:hunter2@redis.local:6379/0")
    shown = repr(config)
    assert "hunter2" not in shown and "t0k3n-x" not in shown
    assert "redis://default:***@redis.local:6379/0" in shown
