"""Serving benchmark: gRPC streaming vs the in-process engine, and adapter promotion / cold-miss latency.

    python -m bench.serving [--streams 32] [--new 64] [--reps 50]

Model and adapters are the engine benchmark's (bench/engine_cpu.py: Llama hidden 512, 8 layers,
rank-16 adapters on all 7 projections). The data plane runs as its own process (as deployed) next
to an in-thread control plane and a private Redis; the clients are this process. Results go to
bench/results/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.engine_cpu import MODEL, N_ADAPTERS, RANK, build
from bench.machine import describe
from control_plane.config import ControlPlaneConfig
from control_plane.server import ControlPlane
from data_plane.engine.config import EngineConfig
from data_plane.engine.engine import Engine
from data_plane.engine.request import SamplingParams
from data_plane.lora.adapter_cache import AdapterCache
from data_plane.lora.cpu_cache import CpuCache
from data_plane.lora.disk_cache import DiskCache
from data_plane.lora.fetcher import Fetcher, FetcherConfig
from loraplane.client import AsyncClient, Client
from loraplane.embedded_redis import EmbeddedRedis, free_port

TOKEN = "bench-admin"
PROMPT = 64


def adapter_dir(workdir: Path, i: int) -> Path:
    return workdir / "adapters" / f"a{i}"  # where bench.engine_cpu.build saves adapter i


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def make_engine(model: Path, streams: int, new: int) -> tuple[Engine, dict]:
    from loraplane.adapter_format import normalize_peft_dir
    from loraplane.model_spec import ModelSpec

    engine = Engine(EngineConfig(model=str(model), max_loras=N_ADAPTERS, max_lora_rank=RANK,
                                 max_num_seqs=streams, max_model_len=PROMPT + new, dtype="float32",
                                 enable_prefix_caching=False))  # as the data plane below: repeats reuse prompts
    spec = ModelSpec.from_pretrained(str(model))
    normalized = {i: normalize_peft_dir(adapter_dir(model.parent, i), spec, RANK) for i in range(N_ADAPTERS)}
    for i, adapter in normalized.items():
        engine.load_adapter(f"a{i}", i, adapter)
    return engine, normalized


def in_process(engine: Engine, prompts, adapters, new: int) -> float:
    """Tokens/s of the engine driven directly, all adapters already in slots."""
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    t0 = time.perf_counter()
    done = engine.generate(prompts, adapters, params)
    elapsed = time.perf_counter() - t0
    assert all(len(c.token_ids) == new for c in done)
    return len(prompts) * new / elapsed


def promotions(engine: Engine, normalized: dict, reps: int) -> list[float]:
    """A CPU-tier adapter copied into a GPU slot (here the slot buffers live in host memory)."""
    times = []
    for rep in range(reps):
        i = rep % N_ADAPTERS
        engine.evict_adapter(f"a{i}")
        t = time.perf_counter()
        engine.load_adapter(f"a{i}", i, normalized[i])
        times.append(time.perf_counter() - t)
    return times


async def over_grpc(address: str, prompts, adapters, new: int) -> float:
    async with AsyncClient(address) as client:
        for i in range(N_ADAPTERS):  # adapters into slots first, as the in-process run has them
            async for _ in client.generate(prompts[i], f"a{i}", max_tokens=2, ignore_eos=True):
                pass

        async def one(prompt, adapter):
            n = 0
            async for msg in client.generate(prompt, adapter, max_tokens=new, ignore_eos=True, timeout=600):
                n += len(msg.token_ids)
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p, a) for p, a in zip(prompts, adapters, strict=True)))
        elapsed = time.perf_counter() - t0
    assert all(c == new for c in counts)
    return sum(counts) / elapsed


async def cold_misses(address: str, reps: int) -> list[float]:
    """Resolve + stream + verify + parse into the CPU tier, from empty tiers every time."""
    fetcher = Fetcher(FetcherConfig(address))
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            cache = AdapterCache(fetcher, CpuCache(4, 1 << 30), DiskCache(Path(tmp) / str(rep), 0))
            t0 = time.perf_counter()
            lease = await cache.acquire(f"a{rep % N_ADAPTERS}")
            times.append(time.perf_counter() - t0)
            cache.release(lease)
    await fetcher.close()
    return times


def start_data_plane(model: Path, cp_address: str, redis_url: str, streams: int, new: int, work: Path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplane.cli", "--log-level", "WARNING", "data-plane", "--model", str(model),
         "--control-plane", cp_address, "--redis-url", redis_url, "--listen", f"127.0.0.1:{port}",
         "--max-loras", str(N_ADAPTERS), "--max-cpu-loras", str(N_ADAPTERS), "--max-lora-rank", str(RANK),
         "--max-num-seqs", str(streams), "--max-model-len", str(PROMPT + new), "--dtype", "float32",
         "--device", "cpu", "--disk-cache-dir", str(work / "dp-disk"), "--no-enable-prefix-caching"])
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    for _ in range(1200):
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1).status == 1:
                return proc, f"127.0.0.1:{port}"
        except grpc.RpcError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("data plane exited at start")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("data plane did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--new", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--reps", type=int, default=50, help="samples for the latency figures")
    ap.add_argument("--repeats", type=int, default=3, help="alternating throughput runs per path (best kept)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serving.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(7)
    prompts = torch.randint(0, MODEL["vocab_size"], (args.streams, PROMPT)).tolist()
    adapters = [f"a{i % N_ADAPTERS}" for i in range(args.streams)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build(work)
        model = work / "model"
        engine, normalized = make_engine(model, args.streams, args.new)
        engine.generate(prompts[:2], adapters[:2], SamplingParams(max_tokens=2))  # warm-up
        promote = promotions(engine, normalized, args.reps)
        with EmbeddedRedis(work / "redis", appendonly=False) as redis:
            loop = asyncio.new_event_loop()
            cp = loop.run_until_complete(ControlPlane(ControlPlaneConfig(
                base_model=str(model), listen="127.0.0.1:0", redis_url=redis.url, data_dir=work / "cp",
                allowed_roots=(work,), admin_token=TOKEN, grace_period_s=1)).start())
            cp_address = f"127.0.0.1:{cp.port}"
            thread = threading.Thread(target=loop.run_forever, daemon=True)
            thread.start()
            with Client(cp_address, TOKEN) as admin:
                for i in range(N_ADAPTERS):
                    admin.create_adapter(f"a{i}", str(adapter_dir(work, i)), wait=True)
            misses = asyncio.run(cold_misses(cp_address, args.reps))
            proc, dp_address = start_data_plane(model, cp_address, redis.url, args.streams, args.new, work)
            # Alternate the two paths so background load on this shared machine hits both alike.
            engine_runs, grpc_runs = [], []
            try:
                for _ in range(args.repeats):
                    engine_runs.append(in_process(engine, prompts, adapters, args.new))
                    grpc_runs.append(asyncio.run(over_grpc(dp_address, prompts, adapters, args.new)))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            asyncio.run_coroutine_threadsafe(cp.stop(), loop).result(60)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
    engine_tps, grpc_tps = max(engine_runs), max(grpc_runs)
    ratio = grpc_tps / engine_tps
    lines = [
        "# Serving benchmark", "", describe("bench.serving"),
        f"Model: Llama hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, vocab "
        f"{MODEL['vocab_size']}, fp32, CPU; {N_ADAPTERS} rank-{RANK} adapters on all 7 projections; "
        f"{args.streams} requests of {PROMPT} prompt + {args.new} generated tokens, spread over the adapters.", "",
        "## gRPC streaming vs the in-process engine", "",
        "| path | tokens/s |", "|---|---|",
        f"| engine in-process (`Engine.generate`) | {engine_tps:.1f} (runs: {', '.join(f'{r:.1f}' for r in engine_runs)}) |",
        f"| data plane over gRPC, {args.streams} concurrent streams (own process) | {grpc_tps:.1f} "
        f"(runs: {', '.join(f'{r:.1f}' for r in grpc_runs)}) |", "",
        f"Ratio {ratio:.3f}: serving through the data plane (gRPC streams, the engine loop's thread and "
        f"adapter leases) costs {max(0.0, 1 - ratio) * 100:.1f}% of in-process throughput "
        f"(target <= 10%: {'met' if ratio >= 0.9 else 'NOT met'}).", "",
        f"## Adapter latency (rank {RANK}, {args.reps} samples each)", "",
        "| path | p50 ms | p99 ms |", "|---|---|---|",
        f"| CPU-tier hit -> GPU slot (`Engine.load_adapter` into the slot buffers) | "
        f"{statistics.median(promote) * 1e3:.2f} | {pct(promote, 99) * 1e3:.2f} |",
        f"| cold miss: resolve + FetchAdapter + verify + parse, control plane on loopback | "
        f"{statistics.median(misses) * 1e3:.2f} | {pct(misses, 99) * 1e3:.2f} |", "",
        "On this CPU-only machine the 'GPU' slot buffers are host memory, so promotion is a host memcpy; on "
        "CUDA it is a pinned-memory host-to-device copy.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
