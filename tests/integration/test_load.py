"""Load: 200 concurrent streaming clients on one data plane, and 64 admins racing on the registry.

Afterwards nothing may have leaked (KV blocks, slots, request counts, file descriptors, memory)
and the registry in Redis must satisfy every invariant the control plane relies on.
Durations are bounded; LORAPLANE_LOAD_SECONDS lengthens the data-plane run for bench/reliability.py,
which also collects the figures written to LORAPLANE_RELIABILITY_OUT.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
import redis

from loraplane.client import Client
from loraplane.embedded_redis import free_port
from loraplane.errors import LoraplaneError
from loraplane.v1 import generation_service_pb2 as gen_pb2
from loraplane.v1 import generation_service_pb2_grpc as gen_grpc
from tests.factories import make_peft_adapter
from tests.integration.dp_helpers import wait_for

CLIENTS = 200
MAX_NUM_SEQS = 8  # the servicer admits 8x this (64) queued + running; 200 clients overflow it
LOAD_SECONDS = float(os.environ.get("LORAPLANE_LOAD_SECONDS", "20"))
WARMUP_SECONDS = 4.0
ADMINS = 64
RACE_SECONDS = float(os.environ.get("LORAPLANE_RACE_SECONDS", "12"))
S = grpc.StatusCode


def record(name: str, data: dict) -> None:
    out = os.environ.get("LORAPLANE_RELIABILITY_OUT")
    if out:
        Path(out, f"{name}.json").write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def load_adapters(base_model, adapter_root):
    made = {}
    for i, name in enumerate(("l1", "l2", "l3")):
        path = adapter_root / f"load-{name}"
        if not path.exists():
            make_peft_adapter(base_model, path, r=8, alpha=16, seed=40 + i, target_modules=("q_proj", "v_proj"))
        made[name] = path
    return made


# ---- the data plane under 200 streaming clients ---------------------------------------------------

def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in body.splitlines() if line and line[0] != "#" and "{" not in line)}


class Load:
    """CLIENTS tasks, each its own channel (own TCP connection), streaming until the deadline."""

    def __init__(self, address: str, seconds: float, server_pid: int | None = None):
        self.address = address
        self.seconds = seconds
        self.server_pid = server_pid  # sent SIGUSR1 (stacks to its log) at the first unexpected outcome
        self.latencies: list[float] = []
        self.outcomes: Counter = Counter()
        self.tokens = 0
        self.unexpected: list[str] = []

    async def client(self, i: int, deadline: float) -> None:
        rng = random.Random(i)
        # A local subchannel pool per channel: otherwise gRPC shares one connection among them all.
        async with grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = gen_grpc.GenerationServiceStub(ch)
            while time.monotonic() < deadline:
                adapter = rng.choice(["", "l1", "l2", "l3"])
                n = rng.randint(4, 16)
                req = gen_pb2.GenerateRequest(request_id=f"c{i}-{rng.getrandbits(48):x}", adapter=adapter,
                                              prompt_token_ids=[rng.randrange(1, 320) for _ in range(rng.randint(3, 24))],
                                              sampling=gen_pb2.SamplingParams(max_tokens=n, ignore_eos=True,
                                                                              temperature=rng.choice([0.0, 0.8])))
                t0 = time.perf_counter()
                got, last = 0, None
                try:
                    async for msg in stub.Generate(req, timeout=60):
                        got += len(msg.token_ids)
                        last = msg
                    if last is None or last.finish_reason != gen_pb2.FINISH_REASON_LENGTH or got != n:
                        self.note_unexpected(f"incomplete: {got}/{n} {last}")
                        continue
                    self.latencies.append(time.perf_counter() - t0)
                    self.tokens += got
                    self.outcomes["completed"] += 1
                except grpc.aio.AioRpcError as e:
                    err = LoraplaneError.from_rpc_error(e)
                    if (err.code, err.reason_name) == (S.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED") and got == 0:
                        self.outcomes["refused"] += 1
                        await asyncio.sleep(rng.uniform(0.05, 0.3))  # back off, as a client should
                    else:
                        self.note_unexpected(f"{err.code.name} {err.reason_name}: {err.message[:200]}")

    def note_unexpected(self, what: str) -> None:
        # This test has failed rarely, with streams hitting their deadline: the server's stacks at that
        # moment are what would say why.
        if not self.unexpected and self.server_pid is not None:
            os.kill(self.server_pid, signal.SIGUSR1)
        self.unexpected.append(what)

    async def run(self) -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(self.client(i, t0 + self.seconds) for i in range(CLIENTS)))
        return time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


@pytest.mark.slow
def test_200_streaming_clients_complete_or_are_refused_cleanly_and_nothing_leaks(
        cp_factory, load_adapters, base_model, redis_url, redis_prefix, tmp_path):
    from tests.fault.conftest import Proc

    cp = cp_factory()
    with cp.client() as c:
        for name, path in load_adapters.items():
            c.create_adapter(name, str(path), wait=True)
    metrics_port, port = free_port(), free_port()
    dp = Proc(["data-plane", "--model", str(base_model), "--control-plane", cp.address, "--redis-url", redis_url,
               "--redis-prefix", redis_prefix, "--listen", f"127.0.0.1:{port}", "--max-loras", "2",
               "--max-cpu-loras", "2", "--max-lora-rank", "16", "--max-model-len", "128",
               "--max-num-seqs", str(MAX_NUM_SEQS), "--device", "cpu", "--disk-cache-dir", str(tmp_path / "disk"),
               "--metrics-port", str(metrics_port), "--grace-period", "5", "--replica-id", "loaded"],
              tmp_path / "dp.log", port)
    try:
        dp.wait_serving()

        def idle():
            m = scrape(metrics_port)
            return (m["loraplane_requests_running"], m["loraplane_requests_waiting"],
                    m["loraplane_kv_cache_usage_ratio"]) == (0, 0, 0)

        # Warm up first (allocator pools, gRPC threads, every adapter fetched once): the baseline
        # is a server that has already done this work.
        asyncio.run(Load(dp.address, WARMUP_SECONDS).run())
        assert wait_for(idle, 30)
        time.sleep(1.0)
        fds0, rss0 = proc_fds(dp.pid), proc_rss_mb(dp.pid)

        load = Load(dp.address, LOAD_SECONDS, server_pid=dp.pid)
        duration = asyncio.run(load.run())
        if load.unexpected:  # the whole log, stacks included: an assertion message would be cut short
            pytest.fail(f"{len(load.unexpected)} unexpected outcomes, first {load.unexpected[:5]}; the data "
                        f"plane's log, with every thread's stack from the first of them:\n{dp.log()[-60000:]}",
                        pytrace=False)
        assert duration < LOAD_SECONDS + 45  # the last requests finish soon after the deadline
        assert load.outcomes["completed"] > 0 and load.outcomes["refused"] > 0, load.outcomes

        # Nothing leaked: engine idle, KV free, no adapter held, the admission count back at zero.
        assert wait_for(idle, 30), scrape(metrics_port)
        with Client(dp.address) as c:
            cached = c.list_cached_adapters()
            assert all(a.active_requests == 0 for a in cached.adapters), cached
        assert wait_for(lambda: proc_fds(dp.pid) <= fds0 + 3, 20), (fds0, proc_fds(dp.pid))
        fds1, rss1 = proc_fds(dp.pid), proc_rss_mb(dp.pid)
        assert rss1 < rss0 * 1.25 + 64, (rss0, rss1)
        # A burst of exactly the admission limit is all accepted: no phantom request holds a place.
        burst = Load(dp.address, 0)
        asyncio.run(_burst(burst, MAX_NUM_SEQS * 8))
        assert burst.outcomes == Counter(completed=MAX_NUM_SEQS * 8) and not burst.unexpected, burst.outcomes
        assert dp.alive()
        lat = sorted(load.latencies)
        figures = {"clients": CLIENTS, "max_num_seqs": MAX_NUM_SEQS, "admission_limit": MAX_NUM_SEQS * 8,
                   "duration_s": round(duration, 1), "requests": sum(load.outcomes.values()),
                   "completed": load.outcomes["completed"], "refused": load.outcomes["refused"],
                   "other_errors": len(load.unexpected), "tokens": load.tokens,
                   "p50_latency_s": round(pct(lat, 50), 3), "p99_latency_s": round(pct(lat, 99), 3),
                   "max_latency_s": round(lat[-1], 3),
                   "fds_before": fds0, "fds_after": fds1, "rss_mb_before": round(rss0, 1),
                   "rss_mb_after": round(rss1, 1)}
        print("\ndata-plane load:", figures)
        record("load_data_plane", figures)
        dp.terminate()
        assert dp.wait(60) == 0
        assert "Traceback" not in dp.log()
    finally:
        if dp.alive():
            dp.kill()


async def _burst(load: Load, n: int) -> None:
    """n requests at once, each on its own connection, every one started before any ends."""
    async def one(i):
        async with grpc.aio.insecure_channel(load.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            await ch.channel_ready()
            await gate.wait()
            stub = gen_grpc.GenerationServiceStub(ch)
            req = gen_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], adapter="l1",
                                          sampling=gen_pb2.SamplingParams(max_tokens=4, ignore_eos=True))
            try:
                got = sum([len(m.token_ids) async for m in stub.Generate(req, timeout=60)])
                load.outcomes["completed" if got == 4 else "incomplete"] += 1
            except grpc.aio.AioRpcError as e:
                load.unexpected.append(f"{e.code().name}: {e.details()}")

    gate = asyncio.Event()
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(2.0)
    gate.set()
    await asyncio.gather(*tasks)


# ---- the registry under 64 racing admins -----------------------------------------------------------

def registry_violations(redis_url: str, prefix: str, artifact_dir: Path) -> list[str]:
    """Every invariant the control plane relies on, checked over Redis and the artifact store."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    base = f"{prefix}:{{reg}}"
    bad: list[str] = []
    index = set(r.zrange(f"{base}:adapters", 0, -1))
    records = {}
    for key in r.scan_iter(f"{base}:adapter:*"):
        records[key.split(":adapter:", 1)[1]] = r.hgetall(key)
    for name in index - set(records):
        bad.append(f"{name} is in the index but has no record")
    for name in set(records) - index:
        bad.append(f"record {name} is missing from the index")
    states = ("PENDING", "DOWNLOADING", "VALIDATING", "READY", "FAILED")
    members = {s: set(r.zrange(f"{base}:state:{s}", 0, -1)) for s in states}
    seen: Counter = Counter(n for s in states for n in members[s])
    for name, count in seen.items():
        if count > 1:
            bad.append(f"{name} is in {count} state indexes")
    if set(seen) != index:
        bad.append(f"state indexes do not cover the index: {sorted(set(seen) ^ index)}")
    for s in states:
        for name in members[s]:
            if name in records and records[name].get("state") != s:
                bad.append(f"{name} is in state:{s} but its record says {records[name].get('state')}")
    pinned = set(r.zrange(f"{base}:pinned", 0, -1))
    flagged = {n for n, h in records.items() if h.get("pinned") == "1"}
    if pinned != flagged:
        bad.append(f"pinned set {sorted(pinned)} != records with pinned=1 {sorted(flagged)}")
    refs = {key.split(":artifact:", 1)[1]: r.smembers(key) for key in r.scan_iter(f"{base}:artifact:*")}
    for name, h in records.items():
        if h.get("state") == "READY":
            version = h.get("version", "")
            if not (artifact_dir / version.removeprefix("sha256:") / "adapter.safetensors").is_file():
                bad.append(f"READY {name} has no artifact for {version}")
            if name not in refs.get(version, set()):
                bad.append(f"READY {name} is not in the refs of {version}")
    for version, names in refs.items():
        for name in names:
            h = records.get(name)
            if h is None:
                bad.append(f"refs of {version} name {name}, which has no record")
            elif h.get("version") != version or h.get("state") != "READY":
                bad.append(f"refs of {version} name {name}, which is {h.get('state')} at {h.get('version')}")
    used = {h.get("version") for h in records.values() if h.get("state") == "READY"}
    for path in artifact_dir.iterdir():
        if path.name == ".tmp":
            leftovers = list(path.iterdir())
            if leftovers:
                bad.append(f"staging leftovers in the store: {leftovers[:3]}")
        elif "sha256:" + path.name not in used:
            bad.append(f"artifact {path.name} is used by no READY adapter (orphan)")
    r.close()
    return bad


ALLOWED = {"OK", "ALREADY_EXISTS/ADAPTER_ALREADY_EXISTS", "NOT_FOUND/ADAPTER_NOT_FOUND",
           "FAILED_PRECONDITION/ADAPTER_PINNED", "ABORTED/ETAG_MISMATCH",
           # Registering from the directory that does not exist: the failure itself is the answer.
           "UNAVAILABLE/SOURCE_UNREACHABLE"}


@pytest.mark.slow
def test_64_admins_racing_create_pin_delete_leave_a_consistent_registry(
        cp_factory, load_adapters, adapter_root, redis_url, redis_prefix):
    cp = cp_factory(max_concurrent_ingests=4)
    # Two names per content: deletes and creates of one artifact race through its reference count.
    sources = [str(load_adapters["l1"]), str(load_adapters["l1"]), str(load_adapters["l2"]),
               str(load_adapters["l2"]), str(load_adapters["l3"]), str(adapter_root / "missing-adapter")]
    names = [f"race-{i}" for i in range(12)]
    outcomes: Counter = Counter()
    unexpected: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + RACE_SECONDS

    def admin(i: int) -> None:
        rng = random.Random(1000 + i)
        with Client(cp.address, cp.token, timeout=60) as c:
            while time.monotonic() < deadline:
                name = rng.choice(names)
                op = rng.choice(["create", "create", "create_wait", "pin", "unpin", "delete", "delete",
                                 "delete_etag", "get", "list"])
                try:
                    if op == "create":
                        c.create_adapter(name, rng.choice(sources), pinned=rng.random() < 0.3)
                    elif op == "create_wait":
                        c.create_adapter(name, rng.choice(sources), wait=True, pinned=rng.random() < 0.3)
                    elif op == "pin":
                        c.pin_adapter(name)
                    elif op == "unpin":
                        c.unpin_adapter(name)
                    elif op == "delete":
                        c.delete_adapter(name)
                    elif op == "delete_etag":
                        c.delete_adapter(name, c.get_adapter(name).etag)
                    elif op == "get":
                        c.get_adapter(name)
                    else:
                        list(c.list_adapters(page_size=5))
                    outcome = "OK"
                except LoraplaneError as e:
                    outcome = f"{e.code.name}/{e.reason_name}"
                with lock:
                    outcomes[f"{op}:{outcome}"] += 1
                    if outcome not in ALLOWED:
                        unexpected.append(f"{op} {name}: {outcome}")

    threads = [threading.Thread(target=admin, args=(i,)) for i in range(ADMINS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(RACE_SECONDS + 120)
    duration = time.monotonic() - t0
    assert not unexpected, unexpected[:20]
    # Let every started ingest finish (or fail) before judging the state.
    with cp.client() as c:
        assert wait_for(lambda: not any(list(c.list_adapters(state=s)) for s in ("pending", "downloading",
                                                                                   "validating")), 60)
    violations = registry_violations(redis_url, redis_prefix, cp.config.artifact_dir)
    assert not violations, violations
    with cp.client() as c:  # and the API agrees with Redis
        listed = {a.name: a for a in c.list_adapters()}
        for a in listed.values():
            if a.state == 4:
                assert c.fetch_adapter(a.name, a.version)
    ops = sum(outcomes.values())
    figures = {"admins": ADMINS, "names": len(names), "duration_s": round(duration, 1), "operations": ops,
               "outcomes": dict(sorted(outcomes.items())), "final_adapters": len(listed),
               "invariant_violations": len(violations)}
    print("\nregistry race:", figures)
    record("load_registry", figures)
    assert ops > ADMINS * 5


def test_invariant_checker_catches_what_it_checks(cp, good_adapter, redis_url, redis_prefix):
    with cp.client() as c:
        a = c.create_adapter("checked", str(good_adapter), wait=True)
    assert registry_violations(redis_url, redis_prefix, cp.config.artifact_dir) == []
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    base = f"{redis_prefix}:{{reg}}"
    r.zadd(f"{base}:pinned", {"checked": 0})
    r.zadd(f"{base}:adapters", {"ghost": 0})
    (cp.config.artifact_dir / ("f" * 64)).mkdir()
    found = " | ".join(registry_violations(redis_url, redis_prefix, cp.config.artifact_dir))
    for needle in ("pinned set", "ghost is in the index", "orphan", "do not cover"):
        assert needle in found, needle
    r.zrem(f"{base}:pinned", "checked")
    r.zrem(f"{base}:adapters", "ghost")
    (cp.config.artifact_dir / ("f" * 64)).rmdir()
    r.srem(f"{base}:artifact:{a.version}", "checked")
    assert "not in the refs" in " ".join(registry_violations(redis_url, redis_prefix, cp.config.artifact_dir))
    r.close()


def test_recreating_a_pinned_failed_adapter_keeps_the_pinned_set_consistent(cp, good_adapter, adapter_root,
                                                                          redis_url, redis_prefix):
    """A FAILED record may be replaced by a new registration; its pin must not outlive it."""
    with cp.client() as c:
        c.create_adapter("phoenix", str(adapter_root / "not-there"))
        assert wait_for(lambda: c.get_adapter("phoenix").state == 5, 20)
        c.pin_adapter("phoenix")
        replaced = c.create_adapter("phoenix", str(good_adapter), wait=True)
        assert replaced.state == 4 and not replaced.pinned
    assert registry_violations(redis_url, redis_prefix, cp.config.artifact_dir) == []


class HangingHub:
    """A "Hub" that accepts connections and never answers until released: it holds an ingest slot."""

    def __init__(self):
        import socket

        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list = []
        self.connected = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)
            self.connected.set()

    def release(self):
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_a_stale_ingest_never_completes_a_newer_registration(cp_factory, load_adapters, redis_url, redis_prefix):
    """Register N from one source, delete it, register N again from another: the first job, still
    queued, must not run against the second record and make it READY with the first source's bytes."""
    hub = HangingHub()
    cp = cp_factory(max_concurrent_ingests=1, hf_endpoint=hub.url, source_timeout_s=30)
    try:
        with cp.client() as c:
            expected = c.create_adapter("reference", str(load_adapters["l2"]), wait=True).version
            c.create_adapter("gatekeeper", "hf://org/slow")  # takes the only ingest slot and hangs there
            assert hub.connected.wait(10)
            c.create_adapter("reborn", str(load_adapters["l1"]))  # job 1 waits for the slot
            c.delete_adapter("reborn")
            c.create_adapter("reborn", str(load_adapters["l2"]))  # job 2 waits behind it
            hub.release()  # the gatekeeper fails; the queued jobs run
            assert wait_for(lambda: c.get_adapter("reborn").state in (4, 5), 30)
            reborn = c.get_adapter("reborn")
            assert (reborn.state, reborn.source, reborn.version) == (4, f"file://{load_adapters['l2']}", expected)
            assert c.get_adapter("gatekeeper").state == 5
    finally:
        hub.release()
    assert registry_violations(redis_url, redis_prefix, cp.config.artifact_dir) == []
