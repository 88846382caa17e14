"""The sweeps: distinct adapters in flight, total adapters, popularity skew, memory per LoRA slot.

Configurations compared in one sweep are run interleaved (A B C, A B C, ...) so load from
other processes on a shared machine falls on all of them alike; each row reports its best run
and lists every run.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.artifacts import AdapterStore, write_model
from bench.harness import Summary, run
from bench.profiles import Profile
from bench.report import TIER_NOTE, Check, Section, best, table
from bench.targets import EngineSetup, InProcessTarget
from bench.workloads import LengthDist, Workload, adapter_ranks
from loraplane.model_spec import LORA_MODULES, ModelSpec


class Bench:
    """One suite run's shared state: profile, model on disk, adapter origin, SLOs."""

    def __init__(self, profile: Profile, workdir: Path, slo_ttft_ms: float, slo_tpot_ms: float):
        self.profile = profile
        self.workdir = workdir
        self.slo = (slo_ttft_ms / 1e3, slo_tpot_ms / 1e3)
        self.model_dir = write_model(workdir / "model", profile.model, seed=0, dtype=profile.dtype)
        self.spec = ModelSpec.from_pretrained(str(self.model_dir))
        self.store = AdapterStore(workdir / "store", self.spec, profile.dtype, lazy=profile.lazy_store)
        self.store.ensure([profile.rank] * profile.peer_adapters)

    def workload(self, **changes) -> Workload:
        p = self.profile
        base = Workload(num_requests=p.sweep_requests, num_adapters=p.peer_adapters, popularity="round_robin",
                        concurrency=p.concurrency, prompt_len=p.prompt, output_len=p.output,
                        ranks=str(p.rank), vocab_size=self.spec.vocab_size, seed=0)
        return base.with_(**changes)

    def setup(self, **changes) -> EngineSetup:
        p = self.profile
        fields = dict(model=self.model_dir, max_loras=8, max_lora_rank=p.rank, max_cpu_loras=64,
                      max_num_seqs=p.concurrency, max_model_len=p.max_model_len, dtype=p.dtype, device=p.device,
                      disk_bytes=p.disk_tier_bytes)
        return EngineSetup(**{**fields, **changes})

    def target(self, store: AdapterStore | None = None, **changes) -> InProcessTarget:
        return InProcessTarget(self.setup(**changes), store or self.store, self.workdir)

    def run(self, target, workload: Workload) -> Summary:
        return run(target, workload, *self.slo)


def warm(bench: Bench, target: InProcessTarget, num_adapters: int) -> None:
    """Touch every adapter once (2 tokens each) so timed runs see them resident, as in steady state;
    with none, one batch of base-model requests. Every target starts its first timed run warm, so a
    target built per run (--gpu) is not the only one to pay first-call costs in it."""
    bench.run(target, bench.workload(num_requests=num_adapters or bench.profile.concurrency,
                                     num_adapters=num_adapters, output_len=LengthDist.parse("2")))


def warmed(bench: Bench, num_adapters: int, store: AdapterStore | None = None, **setup) -> Callable:
    """A maker of warm targets, for Held."""
    def make() -> InProcessTarget:
        target = bench.target(store, **setup)
        warm(bench, target, num_adapters)
        return target

    return make


class Held:
    """A target (or peer) kept between runs, or, when `keep` is false, built for each run and dropped:
    on one GPU the 8B peers' weights do not all fit at once."""

    def __init__(self, make: Callable, keep: bool):
        self.make = make
        self.keep = keep
        self.target = None

    def run(self, fn: Callable) -> Summary:
        target = self.target or self.make()
        if self.keep:
            self.target = target
        try:
            return fn(target)
        finally:
            if not self.keep:
                release(target)

    def close(self) -> None:
        if self.target is not None:
            release(self.target)
            self.target = None


def release(target) -> None:
    if hasattr(target, "close"):
        target.close()
    if torch.cuda.is_available():
        gc.collect()   # engines hold reference cycles: free their device memory before the next one loads
        torch.cuda.empty_cache()


def interleave(runners: dict[str, Callable[[], Summary]], repeats: int) -> dict[str, list[Summary]]:
    results: dict[str, list[Summary]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            results[name].append(runner())
    return results


def fresh(bench: Bench, workload: Workload, store: AdapterStore | None = None, **setup) -> Callable[[], Summary]:
    """A runner that builds a new target each time and warms its tiers with a 2-token pass of the same
    workload under another seed, so runs start alike from a populated (not a lucky) cache state."""
    def go() -> Summary:
        with bench.target(store, **setup) as target:
            bench.run(target, workload.with_(seed=workload.seed + 1, output_len=LengthDist.parse("2")))
            return bench.run(target, workload)

    return go


def distinct_sweep(bench: Bench) -> tuple[Section, dict]:
    p = bench.profile
    wl = bench.workload(num_requests=p.sweep_requests)
    most = max(p.distinct)
    bench.store.ensure([p.rank] * max(most, p.peer_adapters))
    mixed_store = AdapterStore(bench.workdir / "store-mixed", bench.spec, p.dtype, lazy=p.lazy_store)
    mixed_store.ensure(adapter_ranks(8, "mixed", seed=0))
    lora = Held(warmed(bench, most, max_loras=most), p.resident)
    base = Held(warmed(bench, 0, max_loras=0), p.resident)
    mixed = Held(warmed(bench, 8, mixed_store, max_loras=8, max_lora_rank=max(mixed_store.ranks.values())),
                 p.resident)
    try:
        runners = {"base": lambda: base.run(lambda t: bench.run(t, wl.with_(num_adapters=0)))}
        for k in p.distinct:
            runners[f"{k}"] = (lambda k=k: lora.run(lambda t: bench.run(t, wl.with_(num_adapters=k))))
        runners["8 mixed"] = lambda: mixed.run(lambda t: bench.run(t, wl.with_(num_adapters=8, ranks="mixed")))
        results = interleave(runners, p.repeats)
    finally:
        for held in (lora, base, mixed):
            held.close()
    base_tps = best(results["base"]).tokens_per_s
    rows = [("base model (engine, max_loras=0)", results["base"], ["1.00"])]
    for k in p.distinct:
        rows.append((f"{k} distinct rank-{p.rank} adapter(s), max_loras={most}", results[f"{k}"],
                     [f"{best(results[f'{k}']).tokens_per_s / base_tps:.2f}"]))
    ranks = sorted(mixed_store.ranks.values())
    rows.append((f"8 distinct adapters, mixed ranks {ranks}, max_lora_rank {max(ranks)}, max_loras=8", results["8 mixed"],
                 [f"{best(results['8 mixed']).tokens_per_s / base_tps:.2f}"]))
    sec = Section("distinct", "Sweep: distinct adapters in flight")
    sec.lines = [f"Workload: {wl.describe()}; request i uses adapter i mod k, so every batch mixes k adapters.",
                 "All adapters are in LoRA slots before timing (warm-up), so this isolates the batched LoRA "
                 "compute.", TIER_NOTE, "", *table(rows, "configuration", ["vs base"])]
    data = {"x": list(p.distinct), "tps": [best(results[f"{k}"]).tokens_per_s for k in p.distinct],
            "base": base_tps, "all": {k: [s.tokens_per_s for s in v] for k, v in results.items()}}
    return sec, data


def totals_sweep(bench: Bench) -> tuple[Section, dict]:
    p = bench.profile
    bench.store.ensure([p.rank] * max(p.totals))
    wl = bench.workload(num_requests=p.many_requests, popularity="zipf", skew=1.0)
    setup = dict(max_loras=p.many_max_loras, max_cpu_loras=p.many_max_cpu_loras)
    most = p.totals[-1]
    runners = {n: fresh(bench, wl.with_(num_adapters=n), **setup) for n in p.totals}
    wide = p.concurrency
    runners["wide"] = fresh(bench, wl.with_(num_adapters=most), **{**setup, "max_loras": wide})
    results = interleave(runners, p.repeats)
    first = best(results[p.totals[0]]).tokens_per_s

    bounds = {n: wl.with_(num_adapters=n).tokens_per_step_bound(p.many_max_loras, p.concurrency) for n in p.totals}
    bounds["wide"] = wl.with_(num_adapters=most).tokens_per_step_bound(wide, p.concurrency)

    def cells(key):
        b = best(results[key])
        return [f"{b.tokens_per_step:.1f}", f"{bounds[key]:.1f}", f"{b.tokens_per_s / first:.2f}"]

    rows = [(f"{n} adapters", results[n], cells(n)) for n in p.totals]
    rows.append((f"{most} adapters, max_loras {wide} (= concurrency; what-if: slots are not the limit)",
                 results["wide"], cells("wide")))
    sec = Section("totals", "Sweep: total adapters (power-law popularity)")
    sec.lines = [
        f"Workload: {wl.with_(num_adapters=most).describe()}, with the adapter count per row. Engine "
        f"max_loras={p.many_max_loras}, CPU tier max_cpu_loras={p.many_max_cpu_loras}, disk tier on a local "
        f"directory ({p.disk_tier_bytes / 2**30:.0f} GiB budget), origin = artifacts "
        f"{'made in memory (rotations of one generated adapter)' if p.lazy_store else 'on local disk'} standing in "
        "for the control plane. Each run gets a fresh engine whose tiers are warmed by a 2-token pass of the same workload under seed + 1; "
        "tier counts and timings are of the timed pass only.",
        f"The row with max_loras {wide} shows what is left of the cost when every request in flight can "
        "have its adapter in a slot (the tiers below are unchanged). Tokens/step = output tokens per engine "
        "step, about the mean running batch: with 8 slots and many adapters, requests wait for a slot "
        "and the batch shrinks.",
        "Bound = the most tokens/step any scheduler could reach on the same requests, even knowing them all "
        "in advance (`Workload.tokens_per_step_bound`): each adapter holds a slot for at least its longest "
        f"request's output, and a step holds at most max_loras adapters and {p.concurrency} requests. With "
        "Zipf popularity most of the distinct adapters are named by a single request, so the bound falls with "
        "the adapter count whatever the scheduler does.",
        TIER_NOTE, "", *table(rows, "total adapters", ["tokens/step", "bound", f"vs {p.totals[0]}"])]
    data = {"x": list(p.totals), "tps": [best(results[n]).tokens_per_s for n in p.totals],
            "rates": [best(results[n]).tiers.rates() for n in p.totals],
            "loads": [best(results[n]).tiers.slot_loads_per_request for n in p.totals]}
    last = best(results[most]).tokens_per_s
    cpu_ratio = best(results[most], cpu=True).tokens_per_cpu_s / best(results[p.totals[0]], cpu=True).tokens_per_cpu_s
    sec.checks.append(Check(
        f"{p.totals[0]} -> {p.totals[-1]} adapters (Zipf s=1, max_loras {p.many_max_loras}, "
        f"max_cpu_loras {p.many_max_cpu_loras}) throughput cost", f"{(1 - last / first):.1%} "
        f"({first:.1f} -> {last:.1f} tok/s; {best(results[most]).tokens_per_step:.1f} tokens/step, at most "
        f"{bounds[most]:.1f} for any scheduler, vs {bounds[p.totals[0]]:.1f}); with "
        f"max_loras {wide} {(1 - best(results['wide']).tokens_per_s / first):.1%}; per CPU-second "
        f"{1 - cpu_ratio:.1%}",
        "<= 10%", last / first >= 0.9))
    return sec, data


def skew_sweep(bench: Bench) -> tuple[Section, dict]:
    p = bench.profile
    bench.store.ensure([p.rank] * p.skew_adapters)
    wl = bench.workload(num_requests=p.many_requests, num_adapters=p.skew_adapters, popularity="zipf")
    setup = dict(max_loras=p.many_max_loras, max_cpu_loras=p.many_max_cpu_loras)
    runners = {s: fresh(bench, wl.with_(skew=s), **setup) for s in p.skews}
    repeats = max(1, p.repeats - 1)
    results = interleave(runners, repeats)
    rows = []
    for s in p.skews:
        distinct = len({q.adapter for q in wl.with_(skew=s).requests()})
        rows.append((f"s = {s:g}" + (" (uniform)" if s == 0 else ""), results[s],
                     [str(distinct), f"{best(results[s]).tokens_per_step:.1f}"]))
    sec = Section("skew", "Sweep: popularity skew (Zipf exponent)")
    sec.lines = [f"Workload: {wl.describe()}, with the exponent per row (s = 0 is uniform). Engine "
                 f"max_loras={p.many_max_loras}, max_cpu_loras={p.many_max_cpu_loras}; a fresh engine per run, "
                 "tiers warmed as in the total-adapters sweep; "
                 f"{repeats} run(s) per row.", TIER_NOTE, "", *table(rows, "Zipf exponent", ["distinct adapters used",
                                                                                 "tokens/step"])]
    data = {"x": list(p.skews), "tps": [best(results[s]).tokens_per_s for s in p.skews],
            "rates": [best(results[s]).tiers.rates() for s in p.skews],
            "loads": [best(results[s]).tiers.slot_loads_per_request for s in p.skews]}
    return sec, data


def slot_bytes(model_dims: dict, rank: int, dtype: str, max_loras: int = 8) -> int:
    """Bytes of LoRA slot buffers per slot, as data_plane/lora/layers.py allocates them (on the meta device)."""
    import transformers

    from data_plane.lora.layers import LoraSlots
    from data_plane.models.config import ModelArgs
    from data_plane.models.llama import PACKED_MODULES, LlamaForCausalLM
    from data_plane.models.rope import RotaryEmbedding

    config = transformers.LlamaConfig(**model_dims).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    args = ModelArgs.from_config(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(args, RotaryEmbedding(args, 16, torch.device("meta"))).to(getattr(torch, dtype))
    slots = LoraSlots(model, args.spec, PACKED_MODULES, max_loras, rank)
    return slots.nbytes // max_loras


def formula_bytes(spec: ModelSpec, rank: int, bytes_per_el: int, modules=LORA_MODULES) -> int:
    """r * L * sum over the targeted modules of (d_in + d_out) * bytes: A is [r, d_in], B is [d_out, r]."""
    return rank * spec.num_layers * sum(sum(spec.module_dims(m)) for m in modules) * bytes_per_el


def memory_section(bench: Bench) -> tuple[Section, dict]:
    from bench.profiles import CPU, GPU

    sec = Section("memory", "Memory per LoRA slot vs the formula")
    rows, data, ratios = [], {}, []
    for prof in (CPU, GPU):
        config = {**prof.model, "architectures": ["LlamaForCausalLM"]}
        spec = ModelSpec.from_config(config)
        el = torch.empty(0, dtype=getattr(torch, prof.dtype)).element_size()
        measured = [slot_bytes(prof.model, r, prof.dtype) for r in prof.memory_ranks]
        formula = [formula_bytes(spec, r, el) for r in prof.memory_ranks]
        data[prof.name] = {"ranks": list(prof.memory_ranks), "measured": measured, "formula": formula}
        for r, m, f in zip(prof.memory_ranks, measured, formula, strict=True):
            ratios.append(m / f)
            rows.append(f"| {prof.name} model ({spec.hidden_size} hidden, {spec.num_layers} layers), {prof.dtype} | "
                        f"{r} | {m / 2**20:.2f} | {f / 2**20:.2f} | {m / f:.3f} | {2 * f / 2**20:.2f} | "
                        f"{m / (2 * f):.3f} |")
    sec.lines = [
        "Measured: `LoraSlots.nbytes / max_loras` for the slot buffers `data_plane/lora/layers.py` allocates "
        "(per packed projection, A slot-major as [max_loras, slices x max_rank, d_in]; per slice, B as "
        "[max_loras, max_rank, d_out] on CPU or [max_loras, d_out, max_rank] on GPU; all 7 projections, every layer), built on the meta device so the 8B figures need no memory. "
        "Formula: r x L x sum(d_in + d_out) x bytes.", "",
        "| model | max_lora_rank r | measured MiB/slot | formula MiB | measured / formula | "
        "2 x formula MiB (issue's form) | measured / (2 x formula) |", "|---|---:|---:|---:|---:|---:|---:|",
        *rows, "", real_check(bench), "",
        f"Explanation: measured / formula is {min(ratios):.3f}..{max(ratios):.3f}. The slots hold one "
        "A [r, d_in] and one B [d_out, r] per targeted projection and layer, so the bytes are "
        "r x (d_in + d_out) x L x bytes summed over the 7 modules. The issue's form 2 x r x sum(d_in + d_out) x L x bytes counts the two matrices "
        "twice (d_in + d_out already covers A and B), hence the factor 0.5; it matches only if its '2' is "
        "read as bytes per element of bf16/fp16. Two real factors on top: a slot is sized for max_lora_rank, "
        "so a rank-8 adapter in a rank-64 engine occupies 8x its own size; and the CPU tier stores each "
        "adapter at its own rank (NormalizedAdapter.size_bytes, the same formula at the adapter's r)."]
    return sec, data


def real_check(bench: Bench) -> str:
    """The meta-device figure against a real engine's allocation, for this profile's model."""
    p = bench.profile
    with bench.target(max_loras=8) as target:
        real = target.engine.loras.nbytes // 8
    meta = slot_bytes(p.model, p.rank, p.dtype)
    return (f"Cross-check: a real engine of the {p.name} profile (max_loras 8, max_lora_rank {p.rank}) allocates "
            f"{real} bytes per slot; the meta-device figure is {meta} ({'equal' if real == meta else 'DIFFERENT'}).")


def timed(fn, *args):
    t0 = time.perf_counter()
    sec, data = fn(*args)
    sec.seconds = time.perf_counter() - t0
    return sec, data
