"""Smoke tests of the benchmark suite (bench/): workload statistics, metrics math, the memory formula,
and a tiny end-to-end in-process run. Sizes are tiny; nothing here is a performance figure."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.artifacts import AdapterStore, merge_into
from bench.harness import Record, Tiers, percentile, run, summarize
from bench.peers import HfPeftPeer, merged_matches
from bench.profiles import PROFILES
from bench.run_all import build_profile, parse_args
from bench.sweeps import formula_bytes, slot_bytes
from bench.targets import EngineSetup, InProcessTarget, tiers_from_metrics
from bench.workloads import LengthDist, Workload, adapter_ranks, popularity
from loraplane.adapter_format import digest
from loraplane.model_spec import ModelSpec
from tests.factories import TINY, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-suite")
    model = make_tiny_model(root / "model")
    store = AdapterStore(root / "store", ModelSpec.from_pretrained(str(model)))
    store.ensure([4, 8, 4])
    return root, model, store


# ---- workloads -----------------------------------------------------------------------------------

def test_length_distributions():
    rng = np.random.default_rng(0)
    assert LengthDist.parse("64").sample(rng, 5).tolist() == [64] * 5
    u = LengthDist.parse("10-20").sample(rng, 4000)
    assert u.min() == 10 and u.max() == 20 and abs(u.mean() - 15) < 0.3
    e = LengthDist.parse("exp:32")
    x = e.sample(rng, 4000)
    assert x.min() >= 1 and x.max() <= e.max == 128 and abs(x.mean() - 32) < 2.5
    for bad in ("0", "20-10", "abc", "exp:"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_popularity_shapes():
    assert np.allclose(popularity(4, "uniform"), 0.25)
    z = popularity(1000, "zipf", 1.0)
    assert math.isclose(z.sum(), 1.0) and math.isclose(z[0] / z[9], 10.0)
    assert np.all(np.diff(z) < 0)
    assert np.allclose(popularity(10, "zipf", 0.0), 0.1)   # s = 0 is uniform
    with pytest.raises(ValueError):
        popularity(10, "pareto")


def test_zipf_and_uniform_samples_match_their_distributions():
    n = 20000
    z = Workload(num_requests=n, num_adapters=100, popularity="zipf", skew=1.2, seed=3).requests()
    counts = np.bincount([int(r.adapter[1:]) for r in z], minlength=100) / n
    expected = popularity(100, "zipf", 1.2)
    assert np.abs(counts[:5] - expected[:5]).max() < 0.01
    u = Workload(num_requests=n, num_adapters=10, popularity="uniform", seed=3).requests()
    freq = np.bincount([int(r.adapter[1:]) for r in u], minlength=10) / n
    assert np.abs(freq - 0.1).max() < 0.01
    rr = Workload(num_requests=6, num_adapters=3, popularity="round_robin").requests()
    assert [r.adapter for r in rr] == ["a0", "a1", "a2", "a0", "a1", "a2"]


def test_poisson_arrivals_and_closed_loop():
    reqs = Workload(num_requests=4000, arrival="poisson", rate=8.0, seed=1).requests()
    gaps = np.diff([0.0] + [r.arrival_s for r in reqs])
    assert abs(gaps.mean() - 1 / 8) < 0.01 and abs(gaps.std() - 1 / 8) < 0.015   # exponential: std = mean
    assert all(r.arrival_s is None for r in Workload(num_requests=3).requests())


def test_workloads_are_seeded():
    a = Workload(num_requests=20, num_adapters=50, popularity="zipf", prompt_len=LengthDist.parse("4-9"), seed=5)
    assert a.requests() == a.requests()
    assert a.requests() != a.with_(seed=6).requests()
    assert adapter_ranks(50, "mixed", 0) == adapter_ranks(50, "mixed", 0)
    assert set(adapter_ranks(200, "mixed", 0)) == {8, 16, 32, 64} and adapter_ranks(3, "16") == [16] * 3



def test_tokens_per_step_bound_counts_slots_and_concurrency():
    fixed = dict(prompt_len=LengthDist.parse("4"), output_len=LengthDist.parse("10"), concurrency=8)
    # 8 adapters round robin over 16 requests: 8 slots never limit, so the bound is the concurrency.
    rr = Workload(num_requests=16, num_adapters=8, popularity="round_robin", **fixed)
    assert rr.tokens_per_step_bound(8) == 8.0
    assert rr.tokens_per_step_bound(8, max_num_seqs=4) == 4.0
    # 2 slots for 8 adapters: each needs 10 steps in a slot, 2 at a time -> >= 40 steps for 160 tokens.
    assert rr.tokens_per_step_bound(2) == 160 / 40
    # 16 requests on 16 distinct adapters, 4 slots: each step holds 4 of them at most.
    distinct = Workload(num_requests=16, num_adapters=16, popularity="round_robin", **fixed)
    assert distinct.tokens_per_step_bound(4) == 4.0
    # A longer request keeps its adapter's slot longer: adapter a0 needs 10 steps even when it has 3 requests.
    assert Workload(num_requests=3, num_adapters=1, concurrency=3, output_len=LengthDist.parse("10"),
                    prompt_len=LengthDist.parse("4")).tokens_per_step_bound(1) == 3.0
    base = Workload(num_requests=6, num_adapters=0, **fixed)
    assert base.tokens_per_step_bound(0) == 6.0   # base-only requests need no slot
    with pytest.raises(ValueError, match="max_loras"):
        rr.tokens_per_step_bound(0)
    # Zipf over many adapters: most are named once, so the bound falls far below the concurrency.
    many = Workload(num_requests=96, num_adapters=1000, popularity="zipf", concurrency=32)
    assert many.tokens_per_step_bound(8) < 16 < many.tokens_per_step_bound(32) == 32.0

# ---- metrics ------------------------------------------------------------------------------------

def test_percentiles_interpolate_like_numpy():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert math.isnan(percentile([], 50))


def _record(arrival, first, step, n):
    r = Record("a0", arrival)
    for k in range(n):
        r.delta(first + k * step, 1)
    return r


def test_summary_latencies_and_slo_attainment():
    records = [_record(0.0, 0.1, 0.01, 11), _record(0.0, 0.5, 0.05, 11), _record(1.0, 1.2, 0.02, 1)]
    s = summarize(records, wall_s=2.0, prompt_tokens=30, tiers=Tiers(), slo_ttft_s=0.3, slo_tpot_s=0.03)
    assert s.output_tokens == 23 and s.tokens_per_s == 11.5 and s.requests_per_s == 1.5
    assert s.ttft[50] == pytest.approx(0.2)                       # TTFTs 0.1, 0.5, 0.2
    assert s.tpot[50] == pytest.approx(0.03)                      # TPOTs 0.01, 0.05 (one-token request has none)
    assert s.itl[50] == pytest.approx(0.03)                       # 10 gaps of 0.01 and 10 of 0.05
    assert s.slo_ttft_met == pytest.approx(2 / 3)                 # 0.5 misses
    assert s.slo_tpot_met == pytest.approx(2 / 3)                 # 0.05 misses; no TPOT meets any SLO
    assert s.slo_both_met == pytest.approx(2 / 3)
    multi = Record(None, 0.0)
    multi.delta(0.2, 3)                                           # a delta of several tokens: zero gaps inside
    multi.delta(0.5, 1)
    assert multi.tokens == 4 and multi.gaps == [0.0, 0.0, pytest.approx(0.3)]


def test_tier_rates_and_prometheus_parsing():
    t = Tiers(requests=10, gpu_misses=2, cpu_misses=5, disk_hits=1, disk_misses=3)
    assert t.rates() == {"gpu": 0.8, "cpu": 0.5, "disk": 0.25}
    assert math.isnan(Tiers().rates()["gpu"])
    m = {("loraplane_adapter_requests_total", (("adapter", "a0"),)): 7.0,
         ("loraplane_adapter_requests_total", (("adapter", ""),)): 2.0,
         ("loraplane_adapter_load_seconds_count", (("source", "cpu"),)): 3.0,
         ("loraplane_adapter_load_seconds_count", (("source", "disk"),)): 9.0,
         ("loraplane_adapter_cache_lookups_total", (("result", "miss"), ("tier", "cpu"))): 4.0,
         ("loraplane_adapter_cache_lookups_total", (("result", "hit"), ("tier", "disk"))): 1.0,
         ("loraplane_adapter_cache_lookups_total", (("result", "miss"), ("tier", "disk"))): 3.0}
    assert tiers_from_metrics(m) == Tiers(requests=7, gpu_misses=3, cpu_misses=4, disk_hits=1, disk_misses=3)


# ---- memory formula -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_lazy_store_serves_distinct_valid_adapters_without_generating_each(tiny, tmp_path, dtype):
    root, model, _ = tiny
    spec = ModelSpec.from_pretrained(str(model))
    eager, lazy = (AdapterStore(tmp_path / kind, spec, dtype, lazy=kind == "lazy") for kind in ("eager", "lazy"))
    for store in (eager, lazy):
        store.ensure([8] * 40)
    assert lazy.read("a0") == eager.read("a0")  # the template is a0 as the eager store makes it
    versions = {lazy.version(f"a{i}") for i in range(40)}
    assert len(versions) == 40 and lazy.version("a7") == digest(lazy.read("a7"))
    a0, a7 = lazy.load("a0"), lazy.load("a7")
    assert a7.rank == 8 and a7.tensors.keys() == a0.tensors.keys()
    flat0 = torch.cat([t.flatten() for t in a0.tensors.values()])
    flat7 = torch.cat([t.flatten() for t in a7.tensors.values()])
    # The same values, moved: seven elements along in the file's data section.
    assert torch.equal(flat7.sort().values, flat0.sort().values) and not torch.equal(flat7, flat0)
    assert lazy._templates.keys() == {8}  # generated once, not per adapter
    peft = lazy.peft_dir("a7", tmp_path / "peft")  # the PEFT form holds the same weights as the artifact
    from safetensors.torch import load_file

    saved = load_file(peft / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"],
                       a7.tensors["layers.1.q_proj.lora_A"])


def test_slot_memory_matches_formula_and_real_allocation(tiny):
    _, model, _ = tiny
    spec = ModelSpec.from_pretrained(str(model))
    for rank in (4, 8):
        expected = rank * TINY["num_hidden_layers"] * (
            (64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64)) * 4
        assert formula_bytes(spec, rank, 4) == expected
        assert slot_bytes(TINY, rank, "float32", max_loras=3) == expected
    assert slot_bytes(TINY, 8, "bfloat16") == formula_bytes(spec, 8, 2)
    target = InProcessTarget(EngineSetup(model, max_loras=3, max_lora_rank=8, max_num_seqs=4, max_model_len=32),
                             None, tiny[0])
    try:
        assert target.engine.loras.nbytes // 3 == formula_bytes(spec, 8, 4)
    finally:
        target.close()


# ---- end to end -----------------------------------------------------------------------------------

def test_tiny_in_process_run_with_real_tiers(tiny):
    root, model, store = tiny
    torch.manual_seed(0)
    wl = Workload(num_requests=12, num_adapters=3, popularity="zipf", skew=1.0, concurrency=4,
                  prompt_len=LengthDist.parse("3-8"), output_len=LengthDist.parse("2-5"), vocab_size=256, seed=2)
    setup = EngineSetup(model, max_loras=2, max_lora_rank=8, max_cpu_loras=2, max_num_seqs=4, max_model_len=16)
    with InProcessTarget(setup, store, root) as target:
        first = run(target, wl, slo_ttft_s=60, slo_tpot_s=60)
        second = run(target, wl.with_(arrival="poisson", rate=200.0))
    reqs = wl.requests()
    assert first.requests == 12 and first.output_tokens == sum(r.max_tokens for r in reqs)
    t = first.tiers
    used = len({r.adapter for r in reqs})
    assert used >= 2
    assert t.requests == 12 and t.disk_misses == used and t.disk_hits == 0   # cold: each from the origin once
    assert used <= t.gpu_misses <= 12 and t.cpu_misses >= used
    assert first.slo_both_met == 1.0 and first.ttft[50] > 0 and first.tpot[99] >= first.tpot[50]
    assert first.cpu_s > 0 and first.steps >= max(r.max_tokens for r in reqs) and first.tokens_per_step > 0
    assert second.output_tokens == first.output_tokens and second.tiers.requests == 12



def _threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2,
                    reason="counts OpenMP worker threads: needs Linux and 2+ torch threads")
def test_a_run_leaves_no_openmp_pool_in_the_engine_thread(tiny):
    """Several engines share the suite's process: each run must release its engine thread's pool,
    or the next run's thread pays 2-3x per small op (bench/targets.py, InProcessTarget.detach)."""
    root, model, store = tiny
    wl = Workload(num_requests=2, num_adapters=1, concurrency=2, prompt_len=LengthDist.parse("3"),
                  output_len=LengthDist.parse("2"), vocab_size=256, seed=0)
    with InProcessTarget(EngineSetup(model, max_loras=1, max_lora_rank=8, max_num_seqs=2, max_model_len=16),
                         store, root) as target:
        before = _threads()
        target.loop.call(lambda _engine: torch.ones(1 << 22).add_(1)).result()  # large enough to go parallel
        pool = _threads() - before  # the engine thread's OpenMP workers (thread ids)
        assert pool
        run(target, wl)
        assert not pool & _threads()

def test_static_batches_charge_the_closed_loop_wait_for_the_next_batch():
    from types import SimpleNamespace as R

    from bench.peers import static_batch_records

    first, second = [R(adapter="a0", max_tokens=2), R(adapter="a1", max_tokens=5)], \
        [R(adapter="a0", max_tokens=3), R(adapter="a1", max_tokens=1)]
    # Batch 1 starts at 0 (first tokens at 1.0, then one per 0.1 s) and ends at 1.4; batch 2 starts then.
    recs = static_batch_records([(first, 0.0, 1.0, 0.1), (second, 1.4, 1.0, 0.1)])
    assert [r.arrival for r in recs] == [0.0, 0.0, pytest.approx(1.1), pytest.approx(1.4)]
    assert [r.ttft for r in recs] == [1.0, 1.0, pytest.approx(1.3), pytest.approx(1.0)]  # waited for batch 2
    assert [r.tokens for r in recs] == [2, 5, 3, 1] and recs[1].tpot == pytest.approx(0.1)


def test_tiny_peers_hf_and_merged(tiny):
    root, model, store = tiny
    wl = Workload(num_requests=4, num_adapters=2, popularity="round_robin", concurrency=2,
                  prompt_len=LengthDist.parse("3-6"), output_len=LengthDist.parse("2-4"), vocab_size=256)
    hf = HfPeftPeer(model, {n: store.peft_dir(n, root / "peft") for n in ("a0", "a1")})
    s = hf.run(wl)
    assert s.output_tokens == sum(r.max_tokens for r in wl.requests()) and s.tokens_per_s > 0 and s.cpu_s > 0
    merged_dir = merge_into(model, store.load("a0"), root / "merged")
    setup = EngineSetup(model, max_loras=2, max_lora_rank=8, max_num_seqs=4, max_model_len=32)
    with InProcessTarget(setup, store, root) as lora, \
            InProcessTarget(EngineSetup(merged_dir, max_loras=0, max_num_seqs=4, max_model_len=32), None, root) as m:
        run(lora, wl.with_(num_adapters=1))        # puts a0 in a slot
        assert merged_matches(lora, m, [[1, 2, 3], [4, 5, 6, 7]], 6) == 2


# ---- the suite's command line -----------------------------------------------------------------------

def test_gpu_profile_is_selectable():
    prof = build_profile(parse_args(["--gpu", "--repeats", "5", "--slo-tpot-ms", "40"]))
    assert prof.device == "cuda" and prof.dtype == "bfloat16" and prof.repeats == 5 and prof.slo_tpot_ms == 40
    assert prof.model["hidden_size"] == 4096 and prof.model["num_hidden_layers"] == 32
    assert prof.concurrency == 64 and prof.peer_adapters == 32 and prof.lazy_store
    cpu = build_profile(parse_args([]))
    assert cpu.device == "cpu" and cpu.threads == 2 and cpu.model["hidden_size"] == 512
    assert max(cpu.totals) >= 1000 and cpu.distinct == (1, 8, 32)
    with pytest.raises(SystemExit):
        parse_args(["--sections", "peers,nope"])


@pytest.mark.parametrize("gpu_knobs", [False, True], ids=["cpu-profile", "gpu-profile-knobs"])
def test_suite_sections_on_a_tiny_profile(tmp_path, gpu_knobs):
    """Every section and its plot, end to end, at toy sizes (the figures mean nothing). With the --gpu
    profile's switches too (bf16, adapters generated on fetch, each target built per run), on CPU: a
    GPU session's few minutes must not be the first to run those paths."""
    from bench import plots
    from bench.peers import peers_section
    from bench.profiles import CPU
    from bench.sweeps import Bench, distinct_sweep, memory_section, skew_sweep, timed, totals_sweep

    prof = CPU.with_(model={**TINY}, rank=8, prompt_len="4", output_len="3", concurrency=4, peer_requests=4,
                     peer_adapters=2, peer_var_requests=4, peer_var_prompt="2-6", peer_var_output="1-4",
                     peer_repeats=1, sweep_requests=6, many_requests=6, distinct=(1, 2), totals=(2, 12),
                     skews=(0.0, 1.0), skew_adapters=12, many_max_loras=2, many_max_cpu_loras=4, repeats=1)
    if gpu_knobs:
        gpu = PROFILES["gpu"]
        prof = prof.with_(dtype=gpu.dtype, resident=gpu.resident, lazy_store=gpu.lazy_store)
    bench = Bench(prof, tmp_path, 60_000, 60_000)
    for fn in (memory_section, peers_section, distinct_sweep, totals_sweep, skew_sweep):
        sec, data = timed(fn, bench)
        sec.plot = plots.DRAW[sec.key](data, tmp_path / f"suite_{sec.key}.png", sec.title)
        assert (tmp_path / sec.plot).stat().st_size > 1000
        text = sec.markdown()
        assert sec.title in text and "| " in text
        assert all(c.met in (True, False) for c in sec.checks)


def test_harness_cli_flags_build_the_workload():
    import argparse

    from bench.harness import slo_seconds, workload_args, workload_from

    ap = argparse.ArgumentParser()
    workload_args(ap)
    args = ap.parse_args(["--adapters", "1000", "--popularity", "zipf", "--skew", "1.2", "--arrival", "poisson",
                          "--rate", "3", "--prompt-len", "16-64", "--output-len", "exp:32", "--slo-ttft-ms", "500"])
    wl = workload_from(args, 32000)
    assert (wl.num_adapters, wl.popularity, wl.skew, wl.arrival, wl.rate) == (1000, "zipf", 1.2, "poisson", 3.0)
    assert str(wl.prompt_len) == "16-64" and wl.output_len.kind == "exp"
    assert slo_seconds(args) == (0.5, None)
