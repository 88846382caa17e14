"""bench/kernels.py: the GPU benchmark's code, exercised through its --cpu-smoke path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_smoke_under_triton_interpret(tmp_path):
    """The whole script on tiny shapes, in a fresh process with TRITON_INTERPRET=1 set before
    triton is imported: the classic interpreter mode, next to the per-call one the other tests use.
    The script checks Triton against the reference before timing, so this is a correctness run too."""
    out = tmp_path / "kernels.md"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "bench.kernels", "--cpu-smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "CPU (Triton interpreter)" in text
    assert "`python -m bench.kernels --cpu-smoke --out" in text
    assert text.count("| qkv |") == 2 and text.count("| down |") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_cuda(capsys):
    from bench.kernels import main

    assert main(["--tokens", "64"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_traffic_counts_each_tensor_once():
    from bench.kernels import traffic

    # qkv, rank 16, 64 tokens, 16 adapters, bf16
    t = traffic(4096, (4096, 1024, 1024), 16, 64, 16, 2)
    v = 3 * 64 * 16 * 4
    assert t["shrink"] == 64 * 4096 * 2 + 16 * 3 * 16 * 4096 * 2 + v
    assert t["expand"] == v + 16 * 6144 * 16 * 2 + 2 * 64 * 6144 * 2
    assert t["triton"] == t["shrink"] + t["expand"]


def test_token_slots_shapes():
    from bench.kernels import token_slots

    assert token_slots(6, 4, "decode").tolist() == [0, 1, 2, 3, 0, 1]
    assert token_slots(6, 2, "prefill").tolist() == [0, 0, 0, 1, 1, 1]
