"""The harness against the deployed shape: control plane and data plane as their own processes, over gRPC.

One workload (Poisson arrivals, power-law popularity over 64 adapters) runs on the in-process
target and on the service, and the service's cache hit rates per tier come from its Prometheus
endpoint. The adapters are registered through the control plane's API from PEFT directories.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.report import Section, table
from bench.targets import GrpcTarget
from loraplane.client import AsyncClient
from loraplane.embedded_redis import EmbeddedRedis, free_port

TOKEN = "bench-suite-admin"
NUM_ADAPTERS = 64


def _wait_ready(proc: subprocess.Popen, address: str, service: str, seconds: float = 180) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(proc.args[2:5])} exited with {proc.returncode} at start")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass   # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"{address} did not become ready in {seconds:.0f} s")


@contextmanager
def _process(args: list[str], address: str, service: str, env: dict | None = None):
    proc = subprocess.Popen([sys.executable, "-m", "loraplane.cli", "--log-level", "WARNING", *args],
                            env={**os.environ, **(env or {})})
    try:
        _wait_ready(proc, address, service)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _register(address: str, dirs: dict[str, Path]) -> None:
    async with AsyncClient(address, TOKEN, timeout=300) as client:
        sem = asyncio.Semaphore(4)

        async def one(name, path):
            async with sem:
                await client.create_adapter(name, str(path), wait=True)

        await asyncio.gather(*(one(n, p) for n, p in dirs.items()))


@contextmanager
def service(bench, max_loras: int, max_cpu_loras: int):
    """Redis, control plane, data plane; yields (gRPC address, metrics URL, command lines)."""
    p = bench.profile
    work = bench.workdir / "service"
    peft_root = work / "adapters"
    dirs = {f"a{i}": bench.store.peft_dir(f"a{i}", peft_root) for i in range(NUM_ADAPTERS)}
    cp_port, dp_port, metrics_port = free_port(), free_port(), free_port()
    cp_args = ["control-plane", "--base-model", str(bench.model_dir), "--listen", f"127.0.0.1:{cp_port}",
               "--data-dir", str(work / "cp"), "--allowed-root", str(peft_root)]
    with ExitStack() as stack:
        redis = stack.enter_context(EmbeddedRedis(work / "redis", appendonly=False))
        cp_args += ["--redis-url", redis.url]
        stack.enter_context(_process(cp_args, f"127.0.0.1:{cp_port}", "", {"LORAPLANE_ADMIN_TOKEN": TOKEN}))
        asyncio.run(_register(f"127.0.0.1:{cp_port}", dirs))
        dp_args = ["data-plane", "--model", str(bench.model_dir), "--control-plane", f"127.0.0.1:{cp_port}",
                   "--redis-url", redis.url, "--listen", f"127.0.0.1:{dp_port}", "--max-loras", str(max_loras),
                   "--max-cpu-loras", str(max_cpu_loras), "--max-lora-rank", str(p.rank),
                   "--max-num-seqs", str(p.concurrency), "--max-model-len", str(p.max_model_len),
                   "--dtype", p.dtype, "--device", p.device, "--disk-cache-dir", str(work / "dp-disk"),
                   "--metrics-port", str(metrics_port),
                   "--no-enable-prefix-caching"]  # as the in-process engine it is compared with
        stack.enter_context(_process(dp_args, f"127.0.0.1:{dp_port}", "readiness"))
        yield f"127.0.0.1:{dp_port}", f"http://127.0.0.1:{metrics_port}/metrics", [cp_args, dp_args]


def service_section(bench) -> tuple[Section, dict]:
    p = bench.profile
    wl = bench.workload(num_requests=p.service_requests, num_adapters=NUM_ADAPTERS, popularity="zipf", skew=1.0,
                        arrival="poisson", rate=p.service_rate)
    bench.store.ensure([p.rank] * max(NUM_ADAPTERS, len(bench.store.ranks)))
    with bench.target(max_loras=p.many_max_loras, max_cpu_loras=p.many_max_cpu_loras) as target:
        local = bench.run(target, wl)
    with service(bench, p.many_max_loras, p.many_max_cpu_loras) as (address, metrics_url, commands):
        remote = bench.run(GrpcTarget(address, metrics_url), wl)
    rows = [("engine in-process (EngineLoop + tiers, this process)", [local], []),
            ("data plane over gRPC (own process; control plane, Redis)", [remote], [])]
    sec = Section("service", "The service over gRPC vs the engine in-process")
    cmd = [" ".join(["python -m loraplane.cli", *c]) for c in commands]
    sec.lines = [
        f"Workload: {wl.describe()}; max_loras {p.many_max_loras}, max_cpu_loras {p.many_max_cpu_loras}; both "
        f"start with empty tiers; one run each. SLOs: TTFT <= {bench.slo[0] * 1e3:.0f} ms, TPOT <= "
        f"{bench.slo[1] * 1e3:.0f} ms. Service hit rates come from its Prometheus counters "
        "(loraplane_adapter_cache_lookups_total, loraplane_adapter_load_seconds_count{source=\"cpu\"} for "
        "promotions into slots).", "", *table(rows, "path"), "",
        "Service commands (ports, paths and the Redis URL are per run):", "",
        *[f"    {c}" for c in cmd]]
    return sec, {"labels": ["in-process", "gRPC"], "tps": [local.tokens_per_s, remote.tokens_per_s],
                 "ttft": [local.ttft, remote.ttft]}
