"""Prefix caching on a multi-tenant workload: each adapter's requests share that tenant's system prompt.

    python -m bench.prefix_cache --out bench/results/prefix_cache.md

The engine_cpu bench model (random Llama, hidden 512, 8 layers), fp32, 2 threads, 8 rank-16
adapters. Each repeat draws fresh system prompts (one per adapter) so nothing carries over from
the run before; 32 requests, 4 per adapter, each its tenant's system prompt plus its own user
turn, run closed-loop at concurrency 8 (a finished request lets the next one in). Runs alternate
between prefix caching on and off on one engine build each, and the greedy tokens of the two must
be identical.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.engine_cpu import N_ADAPTERS, RANK, machine
from data_plane.engine.config import EngineConfig
from data_plane.engine.engine import Engine
from data_plane.engine.request import SamplingParams
from loraplane.adapter_format import normalize_peft_dir
from loraplane.model_spec import ModelSpec

SYSTEM, USER, NEW, PER_ADAPTER, CONCURRENCY = 448, 32, 16, 4, 8


def build_engine(workdir: Path, caching: bool) -> Engine:
    engine = Engine(EngineConfig(model=str(workdir / "model"), max_loras=N_ADAPTERS, max_lora_rank=RANK,
                                 max_num_seqs=CONCURRENCY, max_model_len=SYSTEM + USER + NEW, dtype="float32",
                                 enable_prefix_caching=caching))
    spec = ModelSpec.from_pretrained(str(workdir / "model"))
    for i in range(N_ADAPTERS):
        engine.load_adapter(f"a{i}", i, normalize_peft_dir(workdir / "adapters" / f"a{i}", spec, RANK))
    return engine


def workload(seed: int) -> list[tuple[list[int], str]]:
    """Requests in arrival order: tenants interleaved, each with its system prompt and a user turn."""
    g = torch.Generator().manual_seed(seed)
    systems = [torch.randint(0, 32000, (SYSTEM,), generator=g).tolist() for _ in range(N_ADAPTERS)]
    return [(systems[i] + torch.randint(0, 32000, (USER,), generator=g).tolist(), f"a{i}")
            for _ in range(PER_ADAPTER) for i in range(N_ADAPTERS)]


def run(engine: Engine, requests: list[tuple[list[int], str]]) -> dict:
    """Closed loop at CONCURRENCY: wall time, TTFT per request, tokens per request."""
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    pending = list(requests)
    started: dict[str, float] = {}
    ttft: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    order: list[str] = []
    hits_before = engine.blocks.prefix_hits
    t0 = time.perf_counter()

    def submit() -> None:
        prompt, adapter = pending.pop(0)
        rid = engine.add_request(prompt, params, adapter)
        started[rid] = time.perf_counter()
        order.append(rid)

    for _ in range(min(CONCURRENCY, len(pending))):
        submit()
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            if out.token_ids and out.request_id not in ttft:
                ttft[out.request_id] = now - started[out.request_id]
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished and pending:
                submit()
    wall = time.perf_counter() - t0
    return {"wall": wall, "ttft_ms": statistics.median(ttft.values()) * 1e3,
            "tokens": [tokens[r] for r in order], "hit_tokens": engine.blocks.prefix_hits - hits_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per setting; the best is kept")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subprocess.run([sys.executable, "-m", "bench.engine_cpu", "--build", str(workdir)], check=True)
        engines = {caching: build_engine(workdir, caching) for caching in (True, False)}
        for engine in engines.values():  # warm-up, on prompts no measured run uses
            run(engine, workload(seed=10_000)[:CONCURRENCY])
        for i in range(args.repeats):
            requests = workload(seed=i)
            for caching in (True, False):
                rows[caching].append(run(engines[caching], requests))
    same = all(a["tokens"] == b["tokens"] for a, b in zip(rows[True], rows[False], strict=True))
    prompt_tokens = N_ADAPTERS * PER_ADAPTER * (SYSTEM + USER)
    output_tokens = N_ADAPTERS * PER_ADAPTER * NEW
    best = {c: min(r, key=lambda x: x["wall"]) for c, r in rows.items()}
    lines = [
        "# Prefix caching benchmark", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- command: `{' '.join(['python', '-m', 'bench.prefix_cache', *sys.argv[1:]])}`",
        f"- workload: {N_ADAPTERS} rank-{RANK} adapters, each a tenant with its own {SYSTEM}-token system prompt; "
        f"{N_ADAPTERS * PER_ADAPTER} requests ({PER_ADAPTER} per tenant, interleaved), each the system prompt "
        f"+ a {USER}-token user turn, {NEW} new tokens (greedy, ignore_eos); closed loop at concurrency "
        f"{CONCURRENCY}; fresh system prompts every repeat; best of {args.repeats} interleaved runs", "",
        "| prefix caching | wall s (all runs) | requests/s | median TTFT ms | prompt tokens served from cache |",
        "|---|---|---:|---:|---:|",
    ]
    for caching in (True, False):
        b = best[caching]
        walls = ", ".join(f"{r['wall']:.2f}" for r in rows[caching])
        lines.append(f"| {'on' if caching else 'off'} | {b['wall']:.2f} ({walls}) | "
                     f"{N_ADAPTERS * PER_ADAPTER / b['wall']:.2f} | {b['ttft_ms']:.0f} | "
                     f"{b['hit_tokens']} of {prompt_tokens} ({b['hit_tokens'] / prompt_tokens:.0%}) |")
    lines += ["", f"- speed-up with caching (best wall time): {best[False]['wall'] / best[True]['wall']:.2f}x; "
              f"{output_tokens} output tokens per run",
              f"- greedy tokens identical with and without caching, every repeat: {same}"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    if not same:
        sys.exit("prefix caching changed the tokens")


if __name__ == "__main__":
    main()
