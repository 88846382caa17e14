"""The benchmark suite, end to end: `make bench` (= python -m bench.run_all).

    python -m bench.run_all                      # quick CPU profile on the bench model (~15 min, 2 threads)
    python -m bench.run_all --gpu                # Llama-3-8B shapes, bf16, one CUDA GPU
    python -m bench.run_all --sections peers,memory --repeats 1

Writes bench/results/suite.md (machine, commands, every target met / NOT met, one section per
sweep) and bench/results/suite_<section>.png. Models and adapters are generated into a
temporary directory (or --workdir) with fixed seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import plots
from bench.machine import describe
from bench.peers import peers_section
from bench.profiles import PROFILES, Profile
from bench.report import TIER_NOTE, checks_table
from bench.service_point import service_section
from bench.sweeps import Bench, distinct_sweep, memory_section, skew_sweep, timed, totals_sweep

SECTIONS = {"memory": memory_section, "peers": peers_section, "distinct": distinct_sweep,
            "totals": totals_sweep, "skew": skew_sweep, "service": service_section}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the full configuration: Llama-3-8B shapes on one GPU")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved runs per configuration")
    ap.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO (default: the profile's)")
    ap.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO (default: the profile's)")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--workdir", type=Path, default=None, help="keep models and adapters here (default: a temp dir)")
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def build_profile(args: argparse.Namespace) -> Profile:
    profile = PROFILES["gpu" if args.gpu else "cpu"]
    changes = {}
    if args.repeats is not None:
        changes["repeats"] = args.repeats
    if args.slo_ttft_ms is not None:
        changes["slo_ttft_ms"] = args.slo_ttft_ms
    if args.slo_tpot_ms is not None:
        changes["slo_tpot_ms"] = args.slo_tpot_ms
    return profile.with_(**changes)


def header(profile: Profile, total_s: float) -> list[str]:
    m = profile.model
    return [
        "# loraplane benchmark suite", "", describe("bench.run_all"),
        f"Profile **{profile.name}**: random Llama, hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads, {m['num_key_value_heads']} KV heads, intermediate "
        f"{m['intermediate_size']}, vocab {m['vocab_size']}; {profile.dtype} on {profile.device}"
        + (f", {profile.threads} torch threads" if profile.threads else "") + f". Adapters rank {profile.rank} on "
        f"all 7 projections. Requests: prompt {profile.prompt_len}, output {profile.output_len} tokens (greedy, "
        f"ignore_eos), closed loop at concurrency {profile.concurrency} unless a section says otherwise. SLOs for "
        f"attainment: TTFT <= {profile.slo_ttft_ms:g} ms, TPOT <= {profile.slo_tpot_ms:g} ms.", "",
        f"Total wall time: {total_s / 60:.1f} min. Throughput figures are the best of the interleaved runs "
        "(all runs are listed): this machine is shared, and the best run is the least disturbed one.", "",
        "tok/CPU-s: output tokens per CPU-second of the benchmark process (engine thread and adapter loading "
        "included; in-process targets and HF + PEFT only). It is less sensitive than wall time to other "
        "processes taking the cores, so it corroborates the wall-clock ratios; the verdicts use wall time.", "",
        TIER_NOTE, "",
        "To drive an already running data plane with any workload: `python -m bench.harness --address HOST:PORT "
        "--metrics-url http://HOST:PORT/metrics --adapters N --popularity zipf --skew 1.0 --arrival poisson "
        "--rate 4 --requests 200 --slo-ttft-ms 2000 --slo-tpot-ms 200` (adapters registered as a0..aN-1).", ""]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    profile = build_profile(args)
    if profile.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device; this machine has none")
    if profile.threads:
        torch.set_num_threads(profile.threads)
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory(prefix="loraplane-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        bench = Bench(profile, workdir, profile.slo_ttft_ms, profile.slo_tpot_ms)
        for key in args.sections.split(","):
            if key == "service" and not profile.service:
                continue
            print(f"[bench] {key} ...", flush=True)
            sec, data = timed(SECTIONS[key], bench)
            sec.plot = plots.DRAW[key](data, args.out_dir / f"suite_{key}.png", sec.title)
            sections.append(sec)
            print(f"[bench] {key} done in {sec.seconds:.0f} s", flush=True)
    total = time.perf_counter() - start
    checks = [c for s in sections for c in s.checks]
    lines = header(profile, total) + ["## Targets", ""] + checks_table(checks)
    if not profile.device.startswith("cuda"):
        lines += ["", "GPU targets (>= 10x HF + PEFT; LoRA >= 0.9x base with 32 distinct rank-16 adapters in a "
                  "64-request decode batch) need `--gpu` on a CUDA machine: not measured in this run."]
    lines += ["", *(s.markdown() for s in sections)]
    (args.out_dir / "suite.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
