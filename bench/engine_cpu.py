"""CPU benchmark of the engine against HF transformers + PEFT, side by side in one process.

    .venv/bin/python -m bench.engine_cpu --repeats 5 --out bench/results/engine_cpu.md

Model: random Llama (hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1408, vocab 32000),
fp32, torch.set_num_threads(2). Workload: 16 requests over 8 rank-16 adapters on all 7 projections,
64-token prompts, 64 new tokens each (ignore_eos, greedy). Runs (a) HF + PEFT
generate(adapter_names=...) on the whole batch, (b) the engine on the same mixed-adapter batch,
(c) the engine on the same prompts with the base model, (d) (b) again under a KV budget too small
for the batch, to show preemption keeps outputs identical and the budget holds, (e) (b) with the
compiled CPU ops off (the torch ops for LoRA, gather + SDPA for decode attention), interleaved
with (b) and (c).
The model and adapters are built by a child process, so this process's peak RSS is the engine's
until the HF model is loaded for (a), which runs last.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import commit, cpu_isa
from data_plane.engine.config import EngineConfig
from data_plane.engine.engine import Engine
from data_plane.engine.kv_cache import block_bytes
from data_plane.engine.request import SamplingParams
from data_plane.models.onednn_linear import OneDnnLinear
from kernels import cpu_kernel
from loraplane.adapter_format import normalize_peft_dir
from loraplane.model_spec import ModelSpec

MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1408, vocab_size=32000, max_position_embeddings=2048)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_REQ, N_ADAPTERS, RANK, PROMPT, NEW = 16, 8, 16, 64, 64
KV_BUDGET = 64 << 20          # KV cache budget of the main runs, bytes (the batch needs 32 MiB)
TIGHT_KV_BUDGET = 12 << 20    # less than the batch's peak: forces preemption


def build(workdir: Path) -> None:
    """Save the model and the 8 adapters (PEFT puts each adapter in adapters/<name>/)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODEL)).eval()
    base.save_pretrained(workdir / "model", safe_serialization=True)
    peft_model = None
    for i in range(N_ADAPTERS):
        torch.manual_seed(100 + i)
        lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=MODULES, init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(base, lora, adapter_name="a0")
        else:
            peft_model.add_adapter(f"a{i}", lora)
    peft_model.save_pretrained(workdir / "adapters", safe_serialization=True)


def load_hf(workdir: Path):
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).eval()
    base.generation_config.eos_token_id = None  # fixed-length runs, as ignore_eos
    model = PeftModel.from_pretrained(base, workdir / "adapters" / "a0", adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        model.load_adapter(workdir / "adapters" / f"a{i}", adapter_name=f"a{i}")
    return model.eval()


class Timed:
    """Wall seconds and process CPU seconds (all threads) of one run: on a shared CPU the wall
    time depends on the other processes, the CPU time much less."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_hf(model, prompts, adapters) -> tuple[Timed, list[list[int]]]:
    ids = torch.tensor(prompts)
    with torch.inference_mode(), Timed() as timed:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=adapters,
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return timed, out[:, PROMPT:].tolist()


def make_engine(workdir: Path, kv_bytes: int) -> Engine:
    engine = Engine(EngineConfig(model=str(workdir / "model"), max_loras=N_ADAPTERS, max_lora_rank=RANK,
                                 max_num_seqs=N_REQ, max_model_len=PROMPT + NEW, kv_cache_bytes=kv_bytes,
                                 enable_prefix_caching=False,  # repeats reuse the prompts; HF has no such cache
                                 dtype="float32"))
    spec = ModelSpec.from_pretrained(str(workdir / "model"))
    for i in range(N_ADAPTERS):
        engine.load_adapter(f"a{i}", i, normalize_peft_dir(workdir / "adapters" / f"a{i}", spec, RANK))
    return engine


def run_engine(engine: Engine, prompts, adapters) -> tuple[Timed, list[list[int]]]:
    params = SamplingParams(max_tokens=NEW, ignore_eos=True)
    with Timed() as timed:
        done = engine.generate(prompts, adapters, params)
    return timed, [list(c.token_ids) for c in done]


def run_torch_ops(engine: Engine, prompts, adapters) -> tuple[Timed, list[list[int]]]:
    """The mixed run with the compiled CPU ops off: the torch ops they replace, for the A/B."""
    before = os.environ.get(cpu_kernel.ENV)
    os.environ[cpu_kernel.ENV] = "off"
    try:
        return run_engine(engine, prompts, adapters)
    finally:
        if before is None:
            del os.environ[cpu_kernel.ENV]
        else:
            os.environ[cpu_kernel.ENV] = before


def best(runs: list[tuple[Timed, list[list[int]]]]) -> tuple[float, float, list[list[int]]]:
    """Best wall time and best CPU time over repeats (each minimum on its own), and the outputs."""
    return min(t.wall for t, _ in runs), min(t.cpu for t, _ in runs), runs[0][1]


def pair_ratios(mixed_runs, base_runs) -> str:
    """Base/mixed wall time of each repeat's back-to-back pair: how far the ratio moves with the host's load."""
    ratios = sorted(b.wall / m.wall for (m, _), (b, _) in zip(mixed_runs, base_runs, strict=True))
    return f"median {statistics.median(ratios):.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def kv_line(engine: Engine, budget: int) -> str:
    per_block = block_bytes(engine.spec, engine.config.kv_block_size, engine.dtype)
    return (f"budget {budget / 2**20:.1f} MiB; allocated {engine.kv.nbytes / 2**20:.1f} MiB "
            f"({engine.blocks.num_blocks} blocks of {per_block // 1024} KiB); peak in use "
            f"{engine.blocks.peak_used * per_block / 2**20:.1f} MiB ({engine.blocks.peak_used} blocks)")


def _kernel_state() -> str:
    module = cpu_kernel.extension()
    return f"built ({cpu_isa()})" if module is not None else "unavailable, (b) ran the torch ops too"


def omp_prefix() -> str:
    policy = os.environ.get("OMP_WAIT_POLICY")
    return f"OMP_WAIT_POLICY={policy} " if policy else ""


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), platform.processor())
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor()
    return (f"{model} ({cpu_isa()}), {os.cpu_count()} cores visible (lscpu), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration; the best is kept")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the target says 2)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # child process: build and exit
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.build:
        build(args.build)
        return
    torch.manual_seed(1234)
    prompts = torch.randint(0, MODEL["vocab_size"], (N_REQ, PROMPT)).tolist()
    adapters = [f"a{i % N_ADAPTERS}" for i in range(N_REQ)]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        subprocess.run([sys.executable, "-m", "bench.engine_cpu", "--build", str(workdir)], check=True)
        engine = make_engine(workdir, KV_BUDGET)
        run_engine(engine, prompts[:4], adapters[:4])  # warm-up
        mixed_runs, base_runs, torch_runs = [], [], []
        for _ in range(args.repeats):  # interleaved, so load changes on a shared CPU hit all alike
            mixed_runs.append(run_engine(engine, prompts, adapters))
            base_runs.append(run_engine(engine, prompts, [None] * N_REQ))
            torch_runs.append(run_torch_ops(engine, prompts, adapters))
        mixed, base, torch_ops = best(mixed_runs), best(base_runs), best(torch_runs)
        kv_main = kv_line(engine, KV_BUDGET)
        weights = (sum(p.numel() * p.element_size() for p in engine.model.parameters())
                   + sum(m.nbytes for m in engine.model.modules() if isinstance(m, OneDnnLinear))) / 2**20
        memory = (f"model weights {weights:.0f} MiB, LoRA slots {engine.loras.nbytes / 2**20:.0f} MiB, "
                  f"KV cache {engine.kv.nbytes / 2**20:.0f} MiB")
        del engine
        small = make_engine(workdir, TIGHT_KV_BUDGET)
        tight_timed, tight_out = run_engine(small, prompts, adapters)
        tight = (tight_timed.wall, tight_timed.cpu, tight_out)
        kv_tight = f"{kv_line(small, TIGHT_KV_BUDGET)}; {small.scheduler.num_preemptions} preemptions"
        del small
        rss_engine = peak_rss_mib()
        hf_model = load_hf(workdir)
        run_hf(hf_model, prompts[:4], adapters[:4])  # warm-up
        hf = best([run_hf(hf_model, prompts, adapters) for _ in range(args.repeats)])
        rss_all = peak_rss_mib()
    tokens = N_REQ * NEW
    rows = [("(a) HF transformers + PEFT, generate(adapter_names=...)", hf),
            ("(b) engine, mixed adapters (8 adapters x 2 requests)", mixed),
            ("(c) engine, base model only", base),
            ("(d) engine, mixed adapters, KV budget 12 MiB (preempts)", tight),
            (f"(e) engine, mixed adapters, torch ops for LoRA and attention ({cpu_kernel.ENV}=off)", torch_ops)]
    command = " ".join(["python", "-m", "bench.engine_cpu", *sys.argv[1:]])
    lines = [
        "# Engine CPU benchmark", "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit()}",
        f"- machine: {machine()}; 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (the CPU is shared with other processes)",
        f"- command: `{omp_prefix()}{command}`",
        f"- workload: {N_REQ} requests, {N_ADAPTERS} adapters of rank {RANK} on all 7 projections, "
        f"{PROMPT}-token prompts, {NEW} new tokens each (ignore_eos, greedy), fp32; best of {args.repeats}",
        "",
        "| run | wall s | tokens/s | vs HF+PEFT | CPU s | tokens/CPU-s | vs HF+PEFT (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {name} | {wall:.2f} | {tokens / wall:.1f} | {hf[0] / wall:.2f}x | {cpu:.2f} | {tokens / cpu:.1f} "
          f"| {hf[1] / cpu:.2f}x |" for name, (wall, cpu, _) in rows],
        "",
        f"- mixed-adapter / base-only throughput: {base[0] / mixed[0]:.2f} (wall), {base[1] / mixed[1]:.2f} (CPU); "
        f"per interleaved pair (wall): {pair_ratios(mixed_runs, base_runs)}",
        f"- greedy tokens equal to HF+PEFT: {sum(a == b for a, b in zip(hf[2], mixed[2], strict=True))}"
        f"/{N_REQ} requests; (d) equal to (b): {tight_out == mixed[2]}; (e) equal to (b): {torch_ops[2] == mixed[2]}",
        f"- compiled CPU ops (LoRA, decode attention): {_kernel_state()}; (b) vs (e): {torch_ops[0] / mixed[0]:.2f}x (wall), "
        f"per interleaved pair {pair_ratios(mixed_runs, torch_runs)}",
        f"- KV, runs (b)/(c): {kv_main}",
        f"- KV, run (d): {kv_tight}",
        f"- peak RSS: {rss_engine:.0f} MiB after the engine runs ({memory}; the rest is the Python, "
        f"torch and transformers runtime), "
        f"{rss_all:.0f} MiB after HF+PEFT is loaded and run in the same process",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
