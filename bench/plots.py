"""One PNG per suite section (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads


def _save(fig, out: Path) -> str:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.name


def _runs(ax, xs, all_runs) -> None:
    for x, runs in zip(xs, all_runs, strict=True):
        ax.scatter([x] * len(runs), runs, s=12, color="grey", alpha=0.6, zorder=3)


def peers(data: dict, out: Path, title: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(data["labels"]))
    ax.bar(xs, data["tps"], color=["C0", "C0", "C2", "C2", "C3", "C0", "C2", "C3"])
    ax.tick_params(axis="x", labelrotation=30)
    _runs(ax, xs, data["all"])
    ax.set_xticks(list(xs), data["labels"])
    ax.set_ylabel("output tokens/s (best run; dots: all runs)")
    ax.set_title(title)
    return _save(fig, out)


def distinct(data: dict, out: Path, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(data["x"], data["tps"], "o-", label="engine + LoRA")
    ax.axhline(data["base"], color="C2", ls="--", label="base model (no LoRA)")
    _runs(ax, data["x"], [data["all"][str(k)] for k in data["x"]])
    ax.set_xscale("log", base=2)
    ax.set_xticks(data["x"], [str(x) for x in data["x"]])
    ax.set_xlabel("distinct adapters in every batch")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(title)
    return _save(fig, out)


def _with_rates(data: dict, out: Path, title: str, xlabel: str, logx: bool) -> str:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot(data["x"], data["tps"], "o-")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("output tokens/s (best run)")
    ax.set_ylim(bottom=0)
    for tier, color in (("cpu", "C1"), ("disk", "C2")):
        ax2.plot(data["x"], [r[tier] for r in data["rates"]], "o-", color=color, label=f"{tier} tier hit rate")
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("hit rate")
    ax2.set_ylim(-0.02, 1.02)
    ax3 = ax2.twinx()
    ax3.plot(data["x"], data["loads"], "s--", color="C3", label="slot loads per request")
    ax3.set_ylabel("LoRA slot loads per request")
    ax3.set_ylim(bottom=0)
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="center left")
    if logx:
        for a in (ax, ax2):
            a.set_xscale("log")
            a.set_xticks(data["x"], [str(x) for x in data["x"]])
    fig.suptitle(title)
    return _save(fig, out)


def totals(data: dict, out: Path, title: str) -> str:
    return _with_rates(data, out, title, "total adapters (Zipf s=1)", logx=True)


def skew(data: dict, out: Path, title: str) -> str:
    return _with_rates(data, out, title, "Zipf exponent s (0 = uniform)", logx=False)


def memory(data: dict, out: Path, title: str) -> str:
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4))
    for ax, (name, d) in zip(axes, data.items(), strict=True):
        mib = [m / 2**20 for m in d["measured"]]
        ax.plot(d["ranks"], mib, "o", ms=8, label="measured (slot buffers)")
        ax.plot(d["ranks"], [f / 2**20 for f in d["formula"]], "-", label="r·L·Σ(d_in+d_out)·bytes")
        ax.plot(d["ranks"], [2 * f / 2**20 for f in d["formula"]], ":", label="2× that (issue's form)")
        ax.set_xlabel("max_lora_rank")
        ax.set_ylabel("MiB per slot")
        ax.set_title(f"{name} profile model")
        ax.legend()
    fig.suptitle(title)
    return _save(fig, out)


def service(data: dict, out: Path, title: str) -> str:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    ax.bar(data["labels"], data["tps"], color=["C0", "C1"])
    ax.set_ylabel("output tokens/s")
    for i, q in enumerate((50, 90, 99)):
        ax2.bar([x + i * 0.25 for x in range(len(data["labels"]))], [t[q] * 1e3 for t in data["ttft"]], 0.25,
                label=f"TTFT p{q}")
    ax2.set_xticks([x + 0.25 for x in range(len(data["labels"]))], data["labels"])
    ax2.set_ylabel("ms")
    ax2.legend()
    fig.suptitle(title)
    return _save(fig, out)


DRAW = {"peers": peers, "distinct": distinct, "totals": totals, "skew": skew, "memory": memory, "service": service}
