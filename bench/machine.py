"""Describe the machine a benchmark ran on, for the results files."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_isa() -> str:
    """The widest vector ISA torch's CPU kernels use here (AVX512, AVX2, ...): hosts that share a
    model name can differ in it, and it moves every figure (and whether oneDNN has bf16)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def commit() -> str:
    """The checkout's short commit, with "+changes" when its code differs from it (bench/results, which
    the benchmarks themselves rewrite, does not count)."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
                           capture_output=True, text=True).stdout.strip()
    return f"{rev}+changes" if rev and dirty else rev or "unknown"


def describe(module: str) -> str:
    """`module` is the bench's dotted name; the command line is rebuilt from it and sys.argv."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
            f"- commit: {commit()}\n"
            f"- cpu: {cpu_model()} ({cpu_isa()}), {os.cpu_count()} cores visible, {mem:.0f} GiB RAM\n"
            f"- gpu: {gpu}\n"
            f"- python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}\n"
            f"- command: `python -m {module} {' '.join(sys.argv[1:])}`\n")
