"""The load generator and its arithmetic: drive a target with a Workload, time every token, summarise.

A target (bench/targets.py: the engine in-process, or a running data plane over gRPC) exposes
`stream(request)`, an async iterator of the number of tokens in each streamed delta,
`tier_counts()`, and `attach()` / `detach()` around each run. `run(target, workload)` plays the workload against it (closed loop at a
concurrency, or Poisson arrivals) and returns a Summary: throughput, TTFT / TPOT / ITL
percentiles, SLO attainment and cache hit rates per tier.

    python -m bench.harness --target grpc --address 127.0.0.1:50052 --metrics-url http://127.0.0.1:9400/metrics \
        --adapters 64 --popularity zipf --skew 1.0 --arrival poisson --rate 4 --requests 200

Over gRPC the adapters are the ones registered as a0..a{N-1}, at whatever ranks they were
registered with (the suite's in-process sweeps build their own, fixed or mixed rank).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from dataclasses import dataclass, field

import numpy as np

from bench.workloads import LengthDist, Request, Workload

PCTS = (50, 90, 99)


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else math.nan


@dataclass
class Record:
    """One request as the client saw it; times are perf_counter seconds."""

    adapter: str | None
    arrival: float                 # when it was due (Poisson) or sent (closed loop): TTFT counts queueing
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)   # inter-token latencies, one per token after the first

    def delta(self, now: float, n: int) -> None:
        if n <= 0:
            return
        if self.first is None:
            self.first = now
            # A delta of several tokens: they arrived together, so the gaps inside it are zero.
            self.gaps.extend([0.0] * (n - 1))
        else:
            gap = now - self.last
            self.gaps.extend([gap] + [0.0] * (n - 1))
        self.last = now
        self.tokens += n

    @property
    def ttft(self) -> float:
        return self.first - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for one-token outputs)."""
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass
class Tiers:
    """Adapter lookups per tier over one run: gpu = LoRA slots, cpu = host LRU, disk = local files."""

    requests: int = 0          # requests that named an adapter
    gpu_misses: int = 0        # promotions into a slot
    cpu_misses: int = 0
    disk_hits: int = 0
    disk_misses: int = 0       # -> fetched from the origin (the control plane)

    def rates(self) -> dict[str, float]:
        def rate(hits, total):
            return hits / total if total else math.nan

        return {"gpu": rate(self.requests - self.gpu_misses, self.requests),
                "cpu": rate(self.requests - self.cpu_misses, self.requests),
                "disk": rate(self.disk_hits, self.disk_hits + self.disk_misses)}

    @property
    def slot_loads_per_request(self) -> float:
        """Promotions into LoRA slots per adapter request: above 1 when slots thrash."""
        return self.gpu_misses / self.requests if self.requests else math.nan

    def minus(self, before: Tiers) -> Tiers:
        return Tiers(*(getattr(self, f) - getattr(before, f) for f in self.__dataclass_fields__))


@dataclass
class Summary:
    requests: int
    wall_s: float
    output_tokens: int
    prompt_tokens: int
    ttft: dict[int, float]
    tpot: dict[int, float]
    itl: dict[int, float]
    slo_ttft_s: float | None
    slo_tpot_s: float | None
    slo_ttft_met: float         # fractions of requests
    slo_tpot_met: float
    slo_both_met: float
    tiers: Tiers
    steps: int | None = None    # engine steps during the run (in-process only)
    cpu_s: float | None = None  # this process's CPU time during the run (in-process only)

    @property
    def tokens_per_cpu_s(self) -> float:
        """Output tokens per CPU-second of this process: less sensitive than wall time to other
        processes taking the cores, so it corroborates ratios measured on a shared machine."""
        return self.output_tokens / self.cpu_s if self.cpu_s else math.nan

    @property
    def tokens_per_step(self) -> float:
        """Output tokens per engine step: the mean running batch, less the share of steps that feed
        prompts (a step that only feeds chunks of a long prompt counts, with no output token)."""
        return self.output_tokens / self.steps if self.steps else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    def line(self) -> str:
        r = self.tiers.rates()
        return (f"{self.tokens_per_s:.1f} tok/s, {self.requests_per_s:.2f} req/s, TTFT p50/p99 "
                f"{self.ttft[50] * 1e3:.0f}/{self.ttft[99] * 1e3:.0f} ms, TPOT p50/p99 {self.tpot[50] * 1e3:.1f}/"
                f"{self.tpot[99] * 1e3:.1f} ms, SLO both {self.slo_both_met:.0%}, slot loads/request "
                f"{self.tiers.slot_loads_per_request:.2f}, hit cpu/disk {r['cpu']:.0%}/{r['disk']:.0%}")


def summarize(records: list[Record], wall_s: float, prompt_tokens: int, tiers: Tiers,
              slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> Summary:
    ttfts = [r.ttft for r in records]
    tpots = [r.tpot for r in records if r.tpot is not None]
    gaps = [g for r in records for g in r.gaps]
    # A request with one output token has no TPOT: it meets any TPOT SLO.
    ok_ttft = [slo_ttft_s is None or r.ttft <= slo_ttft_s for r in records]
    ok_tpot = [slo_tpot_s is None or r.tpot is None or r.tpot <= slo_tpot_s for r in records]
    n = len(records)
    return Summary(
        requests=n, wall_s=wall_s, output_tokens=sum(r.tokens for r in records), prompt_tokens=prompt_tokens,
        ttft={q: percentile(ttfts, q) for q in PCTS}, tpot={q: percentile(tpots, q) for q in PCTS},
        itl={q: percentile(gaps, q) for q in PCTS}, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s,
        slo_ttft_met=sum(ok_ttft) / n, slo_tpot_met=sum(ok_tpot) / n,
        slo_both_met=sum(a and b for a, b in zip(ok_ttft, ok_tpot, strict=True)) / n, tiers=tiers)


async def _one(target, request: Request, arrival: float) -> Record:
    record = Record(request.adapter, arrival)
    async for n in target.stream(request):
        record.delta(time.perf_counter(), n)
    if record.tokens != request.max_tokens:
        raise RuntimeError(f"request {request.index} got {record.tokens} tokens, asked for {request.max_tokens}")
    return record


async def drive(target, workload: Workload, requests: list[Request]) -> tuple[list[Record], float]:
    """Play `requests` against `target`; returns the records (in request order) and the wall time."""
    start = time.perf_counter()
    if workload.arrival == "poisson":
        async def due(req: Request) -> Record:
            at = start + req.arrival_s
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            return await _one(target, req, at)

        records = await asyncio.gather(*(due(r) for r in requests))
    else:
        pending = iter(requests)
        out: dict[int, Record] = {}

        async def worker() -> None:
            for req in pending:   # a shared iterator: each worker takes the next request when it is free
                out[req.index] = await _one(target, req, time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(min(workload.concurrency, len(requests)))))
        records = [out[r.index] for r in requests]
    return list(records), time.perf_counter() - start


def run(target, workload: Workload, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> Summary:
    """One timed run of `workload` on a started target (tier counters are diffed around it)."""
    requests = workload.requests()

    async def go():
        await target.attach()   # gRPC channels belong to one event loop: one per run
        try:
            before, steps = await target.tier_counts(), getattr(target, "steps", None)
            cpu = time.process_time()
            records, wall = await drive(target, workload, requests)
            cpu = time.process_time() - cpu
            steps = None if steps is None else target.steps - steps
            return records, wall, (await target.tier_counts()).minus(before), steps, cpu
        finally:
            await target.detach()

    records, wall, tiers, steps, cpu = asyncio.run(go())
    summary = summarize(records, wall, sum(len(r.prompt) for r in requests), tiers, slo_ttft_s, slo_tpot_s)
    summary.steps = steps
    # Over gRPC the work happens in another process: this process's CPU time would mean nothing.
    summary.cpu_s = cpu if steps is not None else None
    return summary


def workload_args(ap: argparse.ArgumentParser) -> None:
    """The workload flags, shared by this CLI and bench.run_all."""
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters a0..a{N-1}; 0 = base model")
    ap.add_argument("--popularity", choices=["uniform", "zipf", "round_robin"], default="uniform")
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent (power-law popularity)")
    ap.add_argument("--arrival", choices=["closed", "poisson"], default="closed")
    ap.add_argument("--concurrency", type=int, default=32, help="closed loop: requests in flight")
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson: requests per second")
    ap.add_argument("--prompt-len", default="64", help="N, LO-HI (uniform) or exp:MEAN")
    ap.add_argument("--output-len", default="32", help="N, LO-HI (uniform) or exp:MEAN")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO for the attainment figure")
    ap.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO for the attainment figure")


def workload_from(args, vocab_size: int) -> Workload:
    return Workload(num_requests=args.requests, num_adapters=args.adapters, popularity=args.popularity,
                    skew=args.skew, arrival=args.arrival, concurrency=args.concurrency, rate=args.rate,
                    prompt_len=LengthDist.parse(args.prompt_len), output_len=LengthDist.parse(args.output_len),
                    vocab_size=vocab_size, seed=args.seed)


def slo_seconds(args) -> tuple[float | None, float | None]:
    def s(ms):
        return None if ms is None else ms / 1e3

    return s(args.slo_ttft_ms), s(args.slo_tpot_ms)


def main(argv: list[str] | None = None) -> None:
    from bench.targets import GrpcTarget

    ap = argparse.ArgumentParser(description="Drive a running data plane over gRPC with one workload.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--target", choices=["grpc"], default="grpc",
                    help="the in-process engine is driven through bench.run_all / bench.sweeps")
    ap.add_argument("--address", required=True, help="the data plane's gRPC address")
    ap.add_argument("--metrics-url", default=None, help="its Prometheus endpoint, for cache hit rates per tier")
    ap.add_argument("--token", default=None)
    workload_args(ap)
    args = ap.parse_args(argv)
    target = GrpcTarget(args.address, args.metrics_url, args.token)
    vocab = asyncio.run(target.vocab_size())
    summary = run(target, workload_from(args, vocab), *slo_seconds(args))
    print(summary.line())


if __name__ == "__main__":
    main()
