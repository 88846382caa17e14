"""The two things the harness drives: the engine in-process, and a running data plane over gRPC.

InProcessTarget is the data plane minus gRPC: the real EngineLoop (engine thread, slot LRU,
promotion from the CPU tier), the real AdapterCache over a real CpuCache and DiskCache, and
one stand-in, the origin: artifacts are read from a local AdapterStore instead of streamed
from the control plane. Requests take a lease and are relayed exactly as GenerationServicer
does, so tier hit rates and slot contention are the service's.
"""

from __future__ import annotations

import asyncio
import ctypes
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import torch

from bench.artifacts import AdapterStore
from bench.harness import Tiers
from bench.workloads import Request
from data_plane.engine.config import EngineConfig
from data_plane.engine.engine import Engine
from data_plane.engine.request import SamplingParams
from data_plane.lora.adapter_cache import AdapterCache
from data_plane.lora.cpu_cache import CpuCache
from data_plane.lora.disk_cache import DiskCache
from data_plane.lora.slot_table import SlotTable
from data_plane.server.engine_loop import EngineLoop


def release_openmp_pools() -> None:
    """Free the calling thread's OpenMP worker pool (omp_pause_resource_all, OpenMP 5.0).

    With GNU OpenMP, a thread that starts parallel torch work while another thread's pool exists
    pays 2-3x per small op (docs/architecture.md, "Engine thread"); measured on 2 cores, pausing
    the main thread's pool first removes the penalty for an engine thread started after it. A no-op
    where torch ships no OpenMP library.
    """
    for lib in sorted((Path(torch.__file__).parent / "lib").glob("lib*omp*.so*")):
        pause = getattr(ctypes.CDLL(str(lib)), "omp_pause_resource_all", None)
        if pause is not None:
            pause(2)  # omp_pause_hard


@dataclass(frozen=True)
class _Manifest:
    version: str


class StoreFetcher:
    """The Fetcher interface AdapterCache uses (resolve, fetch), served from an AdapterStore."""

    def __init__(self, store: AdapterStore):
        self.store = store
        self.fetches = 0

    async def resolve(self, name: str) -> _Manifest:
        return _Manifest(await asyncio.to_thread(self.store.version, name))

    async def fetch(self, name: str, version: str) -> bytes:
        if self.store.version(name) != version:
            raise KeyError(f"{name}@{version} is not in the store")
        self.fetches += 1
        return await asyncio.to_thread(self.store.read, name)


class TierCounter:
    """The slice of data_plane.server.metrics.Metrics that AdapterCache and EngineLoop report to."""

    def __init__(self) -> None:
        self.tiers = Tiers()

    def cache_lookup(self, tier: str, hit: bool) -> None:
        if tier == "cpu" and not hit:
            self.tiers.cpu_misses += 1
        elif tier == "disk":
            if hit:
                self.tiers.disk_hits += 1
            else:
                self.tiers.disk_misses += 1

    def adapter_loaded(self, source: str, seconds: float) -> None:
        pass

    def evicted(self, tier: str) -> None:
        pass

    def promoted(self, key: str, seconds: float, victim: str | None) -> None:
        self.tiers.gpu_misses += 1


@dataclass(frozen=True)
class EngineSetup:
    model: Path
    max_loras: int = 8                 # 0: the engine without LoRA
    max_lora_rank: int = 16
    max_cpu_loras: int = 64
    max_num_seqs: int = 32
    max_model_len: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache_bytes: int | None = None
    disk_bytes: int = 20 << 30         # the data plane's default; 0 disables the disk tier


class InProcessTarget:
    def __init__(self, setup: EngineSetup, store: AdapterStore | None, workdir: Path):
        self.setup = setup
        self.store = store
        s = setup

        def build() -> Engine:
            engine = Engine(EngineConfig(
                model=str(s.model), max_loras=s.max_loras, max_lora_rank=s.max_lora_rank,
                max_num_seqs=s.max_num_seqs, max_model_len=s.max_model_len, dtype=s.dtype, device=s.device,
                kv_cache_bytes=s.kv_cache_bytes,
                # Off in benchmarks: interleaved repeats reuse the same prompts, and the peers
                # (HF + PEFT) have no cross-request cache. This measures batching and LoRA.
                enable_prefix_caching=False))
            # First-call allocations and lazy imports, outside any timed run.
            engine.generate([[1, 2, 3]], sampling=SamplingParams(max_tokens=2, ignore_eos=True))
            release_openmp_pools()  # this engine thread's: see detach
            return engine

        self.counter = TierCounter()
        # As the data plane: page-locked host copies on CUDA, so promotion into a slot is an async copy.
        self.cpu = CpuCache(max(1, s.max_cpu_loras), 1 << 40, pin_memory=s.device.startswith("cuda"))
        self.disk = DiskCache(workdir / f"disk-{uuid.uuid4().hex[:8]}", s.disk_bytes)
        self.slots = SlotTable(max(1, s.max_loras), 0)
        # As the data plane, the engine is built and stepped in its own thread; this process's main
        # thread has run torch before (models, HF + PEFT), so its OpenMP pool is released first.
        release_openmp_pools()
        self.loop = EngineLoop.build_and_start(build, self.cpu, self.slots, on_promote=self.counter.promoted)
        self.engine = self.loop.engine
        self.fetcher = StoreFetcher(store) if store is not None else None
        self.cache = AdapterCache(self.fetcher, self.cpu, self.disk, self.counter)

    def close(self) -> None:
        self.loop.stop()
        # A 1,000-adapter run leaves hundreds of MB in its disk tier: one sweep would fill the disk.
        shutil.rmtree(self.disk.root)

    def __enter__(self) -> InProcessTarget:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def steps(self) -> int:
        return self.loop.steps

    async def attach(self) -> None:
        pass

    async def detach(self) -> None:
        # The suite holds several engines (and HF + PEFT) in one process, each stepping in its own
        # thread; a pool left behind makes the next run's thread pay 2-3x per small op (measured:
        # LoRA engine 581 -> 905 tok/s, base 876 -> 1,150, when each run released its pool after).
        # A data plane has one engine thread and never needs this.
        await self.loop.acall(lambda _engine: release_openmp_pools())

    async def tier_counts(self) -> Tiers:
        return Tiers(**vars(self.counter.tiers))

    async def stream(self, request: Request):
        lease = None
        if request.adapter is not None:
            lease = await self.cache.acquire(request.adapter)
            self.counter.tiers.requests += 1
        try:
            sampling = SamplingParams(max_tokens=request.max_tokens, ignore_eos=True)
            outputs = await self.loop.submit(request.prompt, sampling, lease.key if lease else None,
                                             uuid.uuid4().hex)
            while True:
                out = await outputs.get()
                yield len(out.token_ids)
                if out.finished:
                    return
        finally:
            if lease is not None:
                self.cache.release(lease)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def tiers_from_metrics(m: dict[tuple[str, tuple], float]) -> Tiers:
    def total(name: str, **labels) -> int:
        want = set(labels.items())
        return int(sum(v for (n, lab), v in m.items() if n == name and want <= set(lab)))

    # The service counts CPU misses but not hits, and a promotion into a slot as a load from "cpu".
    adapter_requests = total("loraplane_adapter_requests_total") - total("loraplane_adapter_requests_total",
                                                                         adapter="")
    return Tiers(requests=adapter_requests,
                 gpu_misses=total("loraplane_adapter_load_seconds_count", source="cpu"),
                 cpu_misses=total("loraplane_adapter_cache_lookups_total", tier="cpu", result="miss"),
                 disk_hits=total("loraplane_adapter_cache_lookups_total", tier="disk", result="hit"),
                 disk_misses=total("loraplane_adapter_cache_lookups_total", tier="disk", result="miss"))


class GrpcTarget:
    """A running data plane; its adapters must be registered as a0..a{N-1} with the control plane."""

    def __init__(self, address: str, metrics_url: str | None = None, token: str | None = None):
        self.address = address
        self.metrics_url = metrics_url
        self.token = token
        self.client = None

    async def attach(self) -> None:
        from loraplane.client import AsyncClient

        self.client = AsyncClient(self.address, self.token, timeout=600)

    async def detach(self) -> None:
        await self.client.close()
        self.client = None

    async def vocab_size(self) -> int:
        await self.attach()
        try:
            return (await self.client.get_model_info()).vocab_size
        finally:
            await self.detach()

    async def tier_counts(self) -> Tiers:
        if self.metrics_url is None:
            return Tiers()
        return tiers_from_metrics(await asyncio.to_thread(scrape, self.metrics_url))

    async def stream(self, request: Request):
        async for msg in self.client.generate(request.prompt, request.adapter or "", max_tokens=request.max_tokens,
                                              ignore_eos=True):
            yield len(msg.token_ids)
