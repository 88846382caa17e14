"""The compiled CPU decode attention (kernels/cpu_attention.py) against the reference and against
the torch path it replaces (models/attention.py: gather, then SDPA under a mask)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_plane.models.attention import AttentionContext, paged_attention
from kernels import cpu_kernel
from kernels.cpu_attention import paged_decode_attention
from kernels.reference import paged_decode_attention_ref

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
             torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, "on")
    return cpu_kernel.extension()


def make(positions, heads=8, kv_heads=4, head_dim=64, block_size=16, num_blocks=64, dtype=torch.float32, seed=0,
         q_padding=0):
    """Caches full of random values (so a read outside a sequence's visible keys shows), distinct
    random blocks per sequence, and q as a view with q_padding extra heads per row (strided rows)."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    width = max(p // block_size + 1 for p in positions)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in positions])
    q = torch.randn(len(positions), heads + q_padding, head_dim, generator=g).to(dtype)[:, :heads]
    return q, k_cache, v_cache, tables, torch.tensor(positions, dtype=torch.int64)


@pytest.mark.parametrize("positions", [[0], [5, 0, 40, 17], [15, 16, 31, 32, 33], list(range(0, 120, 7))])
@pytest.mark.parametrize("heads,kv_heads", [(8, 4), (4, 4), (8, 1), (6, 2)])
@pytest.mark.parametrize("head_dim", [64, 128, 24])  # 24: the generic (not unrolled) path, with a vector tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(kernel, positions, heads, kv_heads, head_dim, dtype):
    q, k_cache, v_cache, tables, pos = make(positions, heads, kv_heads, head_dim, dtype=dtype, q_padding=3)
    got = paged_decode_attention(kernel, q, k_cache, v_cache, tables, pos)
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, pos)
    assert got.dtype == dtype and got.shape == (len(positions), heads * head_dim)
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("window", [1, 4, 16, 37, 1000])
@pytest.mark.parametrize("block_size", [1, 16])
def test_kernel_sliding_window(kernel, window, block_size):
    q, k_cache, v_cache, tables, pos = make([0, 3, 50, 99, 63], block_size=block_size, num_blocks=256)
    got = paged_decode_attention(kernel, q, k_cache, v_cache, tables, pos, window)
    torch.testing.assert_close(got, paged_decode_attention_ref(q, k_cache, v_cache, tables, pos, window),
                               rtol=1e-5, atol=1e-5)
    if window < 50:  # the window changes the answer, so it was applied
        assert not torch.allclose(got, paged_decode_attention_ref(q, k_cache, v_cache, tables, pos))


def test_kernel_reads_only_the_visible_blocks(kernel):
    """Blocks past a query's position, and before its window, may hold anything (NaN here)."""
    q, k_cache, v_cache, tables, pos = make([20, 45], block_size=8, num_blocks=32)
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, pos, 12)
    for d, p in enumerate(pos.tolist()):
        for b in range(tables.shape[1]):
            if b > p // 8 or b < (p - 11) // 8:
                k_cache[tables[d, b]] = float("nan")
                v_cache[tables[d, b]] = float("nan")
    got = paged_decode_attention(kernel, q, k_cache, v_cache, tables, pos, 12)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 10])
def test_engine_attention_agrees_with_and_without_the_kernel(kernel, window):
    """models/attention.py's decode with the compiled op, and with its torch path (gather + SDPA)."""
    block_size, positions = 16, [70, 3, 16, 47]
    q, k_cache, v_cache, tables, pos = make(positions, block_size=block_size)
    k_new, v_new = torch.randn(len(positions), 4, 64), torch.randn(len(positions), 4, 64)
    slots = tables[torch.arange(len(positions)), pos // block_size] * block_size + pos % block_size
    keys = torch.arange(tables.shape[1] * block_size)[None, :]
    visible = keys <= pos[:, None]
    if window is not None:
        visible &= keys > pos[:, None] - window
    mask = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, None, :]
    outs = []
    for with_kernel in (True, False):
        ctx = AttentionContext(k_cache[None].clone(), v_cache[None].clone(), slots, block_tables=tables,
                               sliding_window=window)
        if with_kernel:
            ctx.cpu_kernel, ctx.decode_positions = kernel, pos
        else:
            ctx.decode_mask = mask
        outs.append(paged_attention(0, q, k_new, v_new, ctx))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_kernel_checks_its_operands(kernel):
    q, k_cache, v_cache, tables, pos = make([20, 45], block_size=8, num_blocks=32)
    call = kernel.paged_decode_attention
    with pytest.raises(RuntimeError, match="past its block table"):
        call(q, k_cache, v_cache, tables, torch.tensor([20, tables.shape[1] * 8]), 0, 0.125)
    with pytest.raises(RuntimeError, match="past its block table"):
        call(q, k_cache, v_cache, tables, torch.tensor([20, -1]), 0, 0.125)
    bad = tables.clone()
    bad[1, 2] = 32
    with pytest.raises(RuntimeError, match="block id out of range"):
        call(q, k_cache, v_cache, bad, pos, 0, 0.125)
    bad[1, 2] = -1
    with pytest.raises(RuntimeError, match="block id out of range"):
        call(q, k_cache, v_cache, bad, pos, 0, 0.125)
    bad[1, 2] = 10**6  # only blocks a query reads are checked, and read: one outside the window is not
    torch.testing.assert_close(call(q, k_cache, v_cache, bad, pos, 8, 64 ** -0.5),
                               paged_decode_attention_ref(q, k_cache, v_cache, tables, pos, 8), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="dtype"):
        call(q.double(), k_cache, v_cache, tables, pos, 0, 0.125)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        call(q[:, :5], k_cache, v_cache, tables, pos, 0, 0.125)  # 5 query heads over 4 KV heads
    with pytest.raises(RuntimeError, match="int64"):
        call(q, k_cache, v_cache, tables.int(), pos, 0, 0.125)
    with pytest.raises(RuntimeError, match="window"):
        call(q, k_cache, v_cache, tables, pos, -1, 0.125)


GENERIC_BUILD = """
import torch
from kernels import cpu_kernel
from kernels.cpu_attention import paged_decode_attention
from kernels.metadata import LoraBatchMeta
from kernels.reference import expand_ref, paged_decode_attention_ref, shrink_ref

assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
module = cpu_kernel.extension()
g = torch.Generator().manual_seed(0)
k, v = torch.randn(32, 16, 4, 24, generator=g), torch.randn(32, 16, 4, 24, generator=g)
tables = torch.stack([torch.randperm(32, generator=g)[:4] for _ in range(5)])
pos, q = torch.tensor([0, 10, 33, 50, 63]), torch.randn(5, 8, 24, generator=g)
for window in (None, 9):
    torch.testing.assert_close(paged_decode_attention(module, q, k, v, tables, pos, window),
                               paged_decode_attention_ref(q, k, v, tables, pos, window), rtol=1e-5, atol=1e-5)
meta = LoraBatchMeta.build(torch.tensor([0, 1, 1, -1, 2]), [4, 4, 4])
a, b = torch.randn(3, 40, 4, generator=g), torch.randn(3, 4, 20, generator=g)  # A k-major, B [S, R, out]
x, y = torch.randn(5, 40, generator=g), torch.randn(5, 20, generator=g)
a_stack, b_stack = a.transpose(1, 2), b.transpose(1, 2)  # [S, R, in], [S, out, R]
expected = y.clone()
expand_ref(expected, shrink_ref(x, (a_stack,), meta), (b_stack,), meta)
cpu_kernel.add_lora(y, x, a, [b_stack], meta)
torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
print("ok")
"""


@pytest.mark.slow
def test_both_ops_build_and_agree_without_isa_flags(tmp_path):
    """A host torch dispatches to none of the x86 ISAs with flags here (aarch64, or
    ATEN_CPU_CAPABILITY=default): no -m flags and no CPU_CAPABILITY macro, so at::vec is generic."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", cpu_kernel.ENV: "on",
           "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", GENERIC_BUILD], env=env, cwd=root, capture_output=True,
                            text=True, timeout=280)  # under pytest's own 300 s
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-4000:]
