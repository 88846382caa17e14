"""Markdown for the suite: sections, target checks, and the table of a set of runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.harness import Summary


@dataclass(frozen=True)
class Check:
    """A target from the issue, and whether this run met it."""

    name: str
    measured: str
    target: str
    met: bool | None      # None: not measurable in this profile

    def line(self) -> str:
        verdict = "n/a" if self.met is None else ("met" if self.met else "NOT met")
        return f"| {self.name} | {self.measured} | {self.target} | **{verdict}** |"


@dataclass
class Section:
    key: str                      # also the PNG's name: suite_<key>.png
    title: str
    lines: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    plot: str | None = None       # file name of its plot, once drawn
    seconds: float = 0.0

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.plot:
            out += [f"![{self.title}]({self.plot})", ""]
        out += self.lines
        out += ["", f"_Section wall time: {self.seconds:.0f} s._", ""]
        return "\n".join(out)


def best(runs: list[Summary], cpu: bool = False) -> Summary:
    """The highest-throughput run (by wall time, or by CPU time): on a shared machine, the least disturbed."""
    if cpu:
        return max(runs, key=lambda s: s.tokens_per_cpu_s if not math.isnan(s.tokens_per_cpu_s) else -1.0)
    return max(runs, key=lambda s: s.tokens_per_s)


def num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1f}"


def ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.0%}"


def loads(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


TIER_NOTE = ("Tier columns: slot loads per req = promotions into a LoRA slot per adapter request (0 when every "
             "adapter stays resident; above 1 means slots thrash); cpu hit = adapter requests that found their "
             "adapter in the CPU tier; disk hit = loads into the CPU tier served from the local disk tier rather than "
             "the origin (the control plane); concurrent misses on one adapter share one load.")

HEADER = ("| {label} | tok/s (best) | all runs tok/s | tok/CPU-s (best) | req/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | "
          "ITL p50/p90/p99 ms | SLO TTFT / TPOT / both | slot loads per req / cpu hit / disk hit |{extra_h}\n"
          "|---|---:|---|---:|---:|---|---|---|---|---|{extra_s}")


def table(rows: list[tuple[str, list[Summary], list[str]]], label: str, extra: list[str] = ()) -> list[str]:
    """One row per configuration: the best run's figures, every run's throughput."""
    head = HEADER.format(label=label, extra_h="".join(f" {e} |" for e in extra),
                         extra_s="---:|" * len(extra))
    out = head.split("\n")
    for name, runs, extra_cells in rows:
        s = best(runs)
        r = s.tiers.rates()
        out.append(
            f"| {name} | {s.tokens_per_s:.1f} | {', '.join(f'{x.tokens_per_s:.1f}' for x in runs)} | "
            f"{num(best(runs, cpu=True).tokens_per_cpu_s)} | {s.requests_per_s:.2f} | {'/'.join(ms(s.ttft[q]) for q in (50, 90, 99))} | "
            f"{'/'.join(ms(s.tpot[q]) for q in (50, 90, 99))} | {'/'.join(ms(s.itl[q]) for q in (50, 90, 99))} | "
            f"{pct(s.slo_ttft_met)} / {pct(s.slo_tpot_met)} / {pct(s.slo_both_met)} | "
            f"{loads(s.tiers.slot_loads_per_request)} / {pct(r['cpu'])} / {pct(r['disk'])} |" + "".join(f" {c} |" for c in extra_cells))
    return out


def checks_table(checks: list[Check]) -> list[str]:
    return ["| target | measured | required | verdict |", "|---|---|---|---|", *(c.line() for c in checks)]
