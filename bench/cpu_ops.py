"""CPU micro-benchmarks behind the engine's CPU choices, side by side in one process.

    python -m bench.cpu_ops --out bench/results/cpu_ops.md

1. Projections of the engine bench model (hidden 512, intermediate 1408, vocab 32000) at decode
   (16 rows) and prefill (1,024 rows): torch's default linear against the oneDNN linear over a
   weight reordered once (data_plane/models/onednn_linear.py). Weights are cold: each call uses
   the next of enough copies to exceed the caches, as a decode step that streams every layer does.
2. The decode LoRA shrink of a packed qkv (8 slots x 2 tokens, rank 16): A held [S, R, in]
   against input-major [S, in, 3R] (data_plane/lora/layers.py), also with cold weights.
3. Decode attention of one layer over the paged KV cache, for the bench model's heads (8 query,
   4 KV, head_dim 64, 16-token blocks): the torch path (gather the blocks with index_select, then
   SDPA under a mask; data_plane/models/attention.py) against the compiled op
   (kernels/cpu_attention.py), each call on the next of the 8 layers' caches.
4. Small parallel ops run from the main thread, from a second thread started after the main one
   has used OpenMP, and from such a thread after the main thread's pool is released
   (bench.targets.release_openmp_pools): why data_plane/server/engine_loop.py builds the engine
   in the thread that steps it.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from bench.machine import describe
from bench.targets import release_openmp_pools

COLD_BYTES = 160 << 20  # more than any cache here: what one decode step of the bench model streams


def per_call_us(fns, reps: int = 3) -> float:
    for f in fns:
        f()
    t0 = time.perf_counter()
    for _ in range(reps):
        for f in fns:
            f()
    return (time.perf_counter() - t0) / reps / len(fns) * 1e6


def linears() -> list[str]:
    rows = ["| projection (out x in) | rows | default linear us | oneDNN reordered us | speed-up |",
            "|---|---:|---:|---:|---:|"]
    for name, n, k in [("qkv", 1024, 512), ("o", 512, 512), ("gate_up", 2816, 512), ("down", 512, 1408),
                       ("lm_head", 32000, 512)]:
        copies = max(2, COLD_BYTES // (n * k * 4))
        weights = [torch.randn(n, k) for _ in range(copies)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        for m in (16, 1024):
            if name == "lm_head" and m > 16:
                continue  # only the sampled rows reach the lm_head
            x = torch.randn(m, k)
            plain = per_call_us([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in weights])
            onednn = per_call_us([lambda p=p, x=x: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                  for p in packed])
            rows.append(f"| {name} ({n} x {k}) | {m} | {plain:.0f} | {onednn:.0f} | {plain / onednn:.2f}x |")
    return rows


def shrink_layouts() -> list[str]:
    slots, tokens, rank, hidden, copies = 8, 2, 16, 512, 16
    xs = torch.randn(slots, tokens, hidden)
    row_major = [torch.randn(slots, 3 * rank, hidden) for _ in range(copies)]
    input_major = [a.transpose(1, 2).contiguous() for a in row_major]
    a = per_call_us([lambda w=w: torch.bmm(xs, w.transpose(1, 2)) for w in row_major], reps=20)
    b = per_call_us([lambda w=w: torch.bmm(xs, w) for w in input_major], reps=20)
    return ["| A layout | us per shrink |", "|---|---:|", f"| [S, 3R, in] (bmm against its transpose) | {a:.1f} |",
            f"| [S, in, 3R] (input-major) | {b:.1f} |"]


def decode_attention() -> list[str]:
    from data_plane.models.attention import AttentionContext, _decode  # noqa: PLC0415
    from kernels import cpu_kernel  # noqa: PLC0415
    from kernels.cpu_attention import paged_decode_attention  # noqa: PLC0415

    module = cpu_kernel.extension()
    if module is None:
        return ["The compiled CPU ops are unavailable here (see LORAPLANE_CPU_KERNEL): nothing to compare."]
    layers, blocks, block_size, kv_heads, heads, head_dim = 8, 256, 16, 4, 8, 64
    k_cache = torch.randn(layers, blocks, block_size, kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    rows = ["| sequences | context tokens | gather + SDPA us | compiled op us | speed-up |", "|---:|---:|---:|---:|---:|"]
    for seqs, context in ((16, 64), (16, 128), (32, 96)):
        width = context // block_size
        tables = torch.randperm(blocks)[:seqs * width].view(seqs, width)
        positions = torch.full((seqs,), context - 1)
        keys = torch.arange(width * block_size)[None, :]
        mask = torch.zeros(seqs, width * block_size).masked_fill_(keys > positions[:, None], float("-inf"))
        ctx = AttentionContext(k_cache, v_cache, positions, block_tables=tables, decode_mask=mask[:, None, None, :])
        q = torch.randn(seqs, heads, head_dim)
        torch_us = per_call_us([lambda i=i, q=q, ctx=ctx: _decode(q, k_cache[i], v_cache[i], ctx)
                                for i in range(layers)], reps=20)
        op_us = per_call_us([lambda i=i, q=q, t=tables, p=positions: paged_decode_attention(
                                 module, q, k_cache[i], v_cache[i], t, p) for i in range(layers)], reps=20)
        rows.append(f"| {seqs} | {context} | {torch_us:.0f} | {op_us:.0f} | {torch_us / op_us:.1f}x |")
    return rows


def small_ops() -> dict[str, float]:
    w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(1024, 512), None)
    x, xs, a, y = torch.randn(16, 512), torch.randn(8, 2, 512), torch.randn(8, 512, 48), torch.randn(1024, 1024)
    ops = {"16-row oneDNN linear": lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
           "decode-sized bmm": lambda: torch.bmm(xs, a), "1M-element add_": lambda: y.add_(1.0)}
    return {name: per_call_us([op], reps=500) for name, op in ops.items()}


def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def threads() -> list[str]:
    main = small_ops()  # the main thread's OpenMP pool now exists
    second = in_thread(small_ops)
    release_openmp_pools()
    released = in_thread(small_ops)
    rows = ["| op | main thread us | second thread us | second thread, main pool released us |",
            "|---|---:|---:|---:|"]
    rows += [f"| {k} | {main[k]:.1f} | {second[k]:.1f} | {released[k]:.1f} |" for k in main]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/cpu_ops.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = ["# CPU micro-benchmarks", "", describe("bench.cpu_ops"), "",
             f"{args.threads} torch threads, fp32, cold weights unless noted. Microseconds per call.", "",
             "## Projections: default linear vs oneDNN over a reordered weight", "", *linears(), "",
             "## Decode LoRA shrink of a packed qkv: A layout", "", *shrink_layouts(), "",
             "## Decode attention of one layer: torch path vs the compiled op", "", *decode_attention(), "",
             "## Small ops by thread (GNU OpenMP)", "", *threads(), ""]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
