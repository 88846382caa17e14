"""Benchmark the Triton multi-LoRA kernels against the torch reference and the HBM roofline.

    .venv/bin/python -m bench.kernels                # on a CUDA GPU; writes bench/results/kernels.md
    .venv/bin/python -m bench.kernels --cpu-smoke    # anywhere: tiny shapes in Triton's interpreter

Shapes are Llama-3-8B's LoRA targets (hidden 4096, q 4096, kv 1024, intermediate 14336) at one rank.
Decode rows give each token its own request, spread round-robin over the adapters; prefill rows
split the tokens into long requests. Timings replay a CUDA graph (launch overhead is what the engine
removes by capturing decode) and rotate through enough copies of every buffer to defeat L2, so the
bandwidth column measures HBM, not cache.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file, bench/ would shadow the kernels package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from kernels.metadata import LoraBatchMeta  # noqa: E402
from kernels.reference import expand_ref, shrink_ref  # noqa: E402

LLAMA3_8B = {  # module: (input width, output width of each slice)
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}
SMOKE = {"qkv": (64, (64, 16, 16)), "down": (96, (32,))}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results" / "kernels.md"


@dataclass
class Row:
    module: str
    shape: str          # decode | prefill
    tokens: int
    adapters: int
    us: dict[str, float]
    bytes_: dict[str, int]
    eager: set[str]     # timed without a CUDA graph (capture failed)


def token_slots(tokens: int, adapters: int, shape: str) -> torch.Tensor:
    if shape == "decode":  # one token per request, requests round-robin over adapters
        return torch.arange(tokens) % adapters
    # prefill: `adapters` requests of equal length, one adapter each
    return torch.arange(tokens) * adapters // tokens


def gather_bmm(y, x, a_stacks, b_stacks, ids, slots_of):
    """The usual torch multi-LoRA: gather every token's A and B, then batched matvecs."""
    xs = x[ids].unsqueeze(-1)                                   # [T_lora, K, 1]
    col = 0
    for a, b in zip(a_stacks, b_stacks, strict=True):
        v = torch.bmm(a[slots_of], xs)                          # [T_lora, R, 1]
        d = torch.bmm(b[slots_of], v).squeeze(-1)               # [T_lora, out]
        y[:, col:col + b.shape[1]].index_add_(0, ids, d.to(y.dtype))
        col += b.shape[1]


def traffic(K, widths, R, tokens, adapters, es) -> dict[str, int]:
    """Bytes each kernel must move at least: inputs read once, outputs written once."""
    n, N = len(widths), sum(widths)
    v = n * tokens * R * 4
    shrink = tokens * K * es + adapters * n * R * K * es + v
    expand = v + adapters * N * R * es + 2 * tokens * N * es
    return {"shrink": shrink, "expand": expand, "triton": shrink + expand}


def make_sets(K, widths, R, tokens, adapters, shape, dtype, device, rotate_bytes):
    """Enough independent copies of (x, A, B, y) that one pass over them overflows L2."""
    slots = token_slots(tokens, adapters, shape).to(device)
    meta = LoraBatchMeta.build(slots, [R] * adapters)
    one = (tokens * K + adapters * R * (len(widths) * K + sum(widths)) + tokens * sum(widths))
    n_sets = max(2, min(64, math.ceil(rotate_bytes / (one * dtype.itemsize))))
    sets = []
    for _ in range(n_sets):
        x = torch.randn(tokens, K, dtype=dtype, device=device)
        a = [torch.randn(adapters, R, K, dtype=dtype, device=device) * K ** -0.5 for _ in widths]
        b = [torch.randn(adapters, w, R, dtype=dtype, device=device) * R ** -0.5 for w in widths]
        y = torch.randn(tokens, sum(widths), dtype=dtype, device=device)
        sets.append((y, x, a, b))
    return meta, sets


def candidates(meta):
    from kernels.expand import expand
    from kernels.shrink import shrink

    args = meta.kernel_args
    ids, slots_of = meta.sorted_token_ids, meta.token_slots[meta.sorted_token_ids].long()
    v_cache = {}

    def run_shrink(y, x, a, b):
        v_cache[id(y)] = shrink(x, a, *args)

    def run_expand(y, x, a, b):
        expand(y, v_cache[id(y)], b, *args)

    def run_triton(y, x, a, b):
        expand(y, shrink(x, a, *args), b, *args)

    def run_ref(y, x, a, b):
        expand_ref(y, shrink_ref(x, a, meta), b, meta)

    def run_bmm(y, x, a, b):
        gather_bmm(y, x, a, b, ids, slots_of)

    return {"shrink": run_shrink, "expand": run_expand, "triton": run_triton,
            "torch ref": run_ref, "gather+bmm": run_bmm}


def time_us(fn, sets, timer: str) -> float:
    turn = itertools.cycle(sets)

    def step():
        fn(*next(turn))

    if timer == "wall":  # the interpreter: one pass, only proves the path runs
        start = time.perf_counter()
        for _ in sets:
            step()
        return (time.perf_counter() - start) / len(sets) * 1e6
    import triton.testing

    torch.cuda.synchronize()  # do_bench_cudagraph runs on its own stream: inputs must be ready
    if timer == "graph":
        try:
            return triton.testing.do_bench_cudagraph(step, rep=50) * 1e3
        except RuntimeError as e:  # a candidate that can't be captured is timed eagerly, flagged
            print(f"  CUDA graph capture failed ({e}); timing with events", file=sys.stderr)
            torch.cuda.synchronize()
            return -triton.testing.do_bench(step, warmup=25, rep=100) * 1e3
    return triton.testing.do_bench(step, warmup=25, rep=100) * 1e3


def check(meta, sets, tol) -> None:
    """The Triton path agrees with the reference before anything is timed."""
    run = candidates(meta)
    y, x, a, b = sets[0]
    # From y = 0, so the comparison sees the LoRA delta rather than y's rounding.
    ref, out = torch.zeros_like(y), torch.zeros_like(y)
    run["torch ref"](ref, x, a, b)
    run["triton"](out, x, a, b)
    err = (out.float() - ref.float()).abs().max().item()
    size = ref.float().abs().max().item()
    if not err <= tol * size:
        raise AssertionError(f"triton differs from the reference by {err:.3g} (delta up to {size:.3g})")


def bench_row(module, K, widths, R, tokens, adapters, shape, dtype, device, timer, rotate_bytes):
    meta, sets = make_sets(K, widths, R, tokens, adapters, shape, dtype, device, rotate_bytes)
    check(meta, sets, tol=3e-2)
    runs = candidates(meta)
    us = {}
    for name in ("shrink", "expand", "triton", "torch ref", "gather+bmm"):
        if name == "expand":  # expand reads the v its set's shrink left behind
            for s in sets:
                runs["shrink"](*s)
        us[name] = time_us(runs[name], sets, timer)
    # A negative time flags an eager fallback; the table marks it and uses its magnitude.
    eager = {k for k, t in us.items() if t < 0}
    us = {k: abs(t) for k, t in us.items()}
    n_active = len(meta.active_slots_list)
    return Row(module, shape, tokens, adapters, us,
               traffic(K, widths, R, meta.num_lora_tokens, n_active, dtype.itemsize), eager)


def grid(tokens_list, adapters_list, prefill_tokens, prefill_requests):
    for t in tokens_list:
        for n in adapters_list:
            if n <= t:
                yield "decode", t, n
    for n in prefill_requests:
        if n <= prefill_tokens:
            yield "prefill", prefill_tokens, n


def render(rows, args, device_name, timer) -> str:
    bw = args.bandwidth
    lines = [
        "# Multi-LoRA kernels: Triton vs torch reference",
        "",
        f"- device: {device_name}",
        f"- command: `{args.command}`",
        f"- torch {torch.__version__}, triton {_triton_version()}, dtype {args.dtype}, rank {args.rank}",
        f"- timer: {timer}; roofline = (x + A + B + v + y bytes) / {bw:.3g} B/s",
        "- `triton` = shrink + expand (one launch each, plus v's memset); `torch ref` ="
        " kernels/reference.py (gather + matmul per slot); `gather+bmm` = per-token gathered A/B + bmm",
        "",
        "| module | shape | tokens | adapters | shrink µs | expand µs | triton µs | torch ref µs"
        " | gather+bmm µs | × ref | × bmm | roofline µs | shrink BW | expand BW | triton BW |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        roof = {k: r.bytes_[k] / bw * 1e6 for k in r.bytes_}
        pct = {k: roof[k] / r.us[k] * 100 for k in roof}
        t = {k: f"{v:.1f}" + (" (e)" if k in r.eager else "") for k, v in r.us.items()}
        lines.append(
            f"| {r.module} | {r.shape} | {r.tokens} | {r.adapters} | {t['shrink']}"
            f" | {t['expand']} | {t['triton']} | {t['torch ref']}"
            f" | {t['gather+bmm']} | {r.us['torch ref'] / r.us['triton']:.1f}"
            f" | {r.us['gather+bmm'] / r.us['triton']:.1f} | {roof['triton']:.1f}"
            f" | {pct['shrink']:.0f}% | {pct['expand']:.0f}% | {pct['triton']:.0f}% |")
    if any(r.eager for r in rows):
        lines += ["", "(e): CUDA graph capture failed for this candidate; timed eagerly with do_bench."]
    if timer == "wall":
        lines += ["", "CPU smoke run: Triton's interpreter, so the times say nothing about the kernels."]
        return "\n".join(lines) + "\n"
    lines += ["", "## Targets", ""]
    key = [r for r in rows if r.shape == "decode" and r.tokens == 64 and r.adapters == 16]
    if key:
        worst = min(r.us["torch ref"] / r.us["triton"] for r in key)
        lines.append(f"- decode, 64 tokens, 16 adapters: slowest speedup over the torch reference"
                     f" {worst:.1f}x (target >= 3x): {'met' if worst >= 3 else 'NOT met'}")
    decode = [r for r in rows if r.shape == "decode"]
    if decode:
        pcts = [r.bytes_[k] / bw * 1e6 / r.us[k] * 100 for r in decode for k in ("shrink", "expand")]
        lines.append(f"- decode-shape kernels, share of HBM bandwidth: median"
                     f" {statistics.median(pcts):.0f}%, min {min(pcts):.0f}% (target >= 50%)")
    return "\n".join(lines) + "\n"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "(not installed)"
    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--bandwidth", type=float, default=3.35e12,
                   help="HBM bandwidth in B/s for the roofline (default: H100 SXM, 3.35e12)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--modules", default=",".join(LLAMA3_8B), help="comma list of " + ",".join(LLAMA3_8B))
    p.add_argument("--tokens", default="1,8,32,64,128,256", help="decode batch sizes")
    p.add_argument("--adapters", default="1,4,16,32")
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--prefill-requests", default="1,4,16",
                   help="prefill rows split --prefill-tokens into this many requests, one adapter each")
    p.add_argument("--timer", choices=("graph", "events"), default="graph",
                   help="graph: replay a CUDA graph (no launch overhead); events: do_bench")
    p.add_argument("--rotate-mb", type=float, default=256,
                   help="buffer copies cycled per timing so L2 (50 MB on H100) can't hold them")
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown output (default {RESULTS.relative_to(RESULTS.parents[2])} on GPU,"
                        " none for --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU in Triton's interpreter: checks the script runs")
    args = p.parse_args(argv)
    args.command = "python -m bench.kernels" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    dtype = DTYPES[args.dtype]

    if args.cpu_smoke:
        device, device_name, timer, modules = torch.device("cpu"), "CPU (Triton interpreter)", "wall", SMOKE
        tokens, adapters, prefill, requests, rotate = [8], [4], 16, [2], 0
        out = args.out
    else:
        if not torch.cuda.is_available():
            print("bench.kernels needs a CUDA GPU and found none; --cpu-smoke runs a tiny check"
                  " of the script in Triton's interpreter.", file=sys.stderr)
            return 2
        device, device_name, timer = torch.device("cuda"), torch.cuda.get_device_name(), args.timer
        modules = {m: LLAMA3_8B[m] for m in args.modules.split(",")}
        tokens = [int(t) for t in args.tokens.split(",")]
        adapters = [int(n) for n in args.adapters.split(",")]
        prefill, requests = args.prefill_tokens, [int(n) for n in args.prefill_requests.split(",")]
        rotate = args.rotate_mb * 2**20
        out = args.out or RESULTS

    torch.manual_seed(0)
    rows = []
    for module, (K, widths) in modules.items():
        for shape, t, n in grid(tokens, adapters, prefill, requests):
            row = bench_row(module, K, widths, args.rank, t, n, shape, dtype, device, timer, rotate)
            rows.append(row)
            print(f"{module:8s} {shape:7s} T={t:4d} adapters={n:3d}  triton {row.us['triton']:9.1f} µs"
                  f"  ref {row.us['torch ref']:9.1f} µs  bmm {row.us['gather+bmm']:9.1f} µs",
                  flush=True)
    text = render(rows, args, device_name, timer)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
