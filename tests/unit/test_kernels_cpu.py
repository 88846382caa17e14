"""The CPU path (kernels/cpu_lora.py) against the reference, in each layout, and when each is chosen."""

from __future__ import annotations

import pytest
import torch

from kernels.cpu_lora import MAX_TOKENS_PER_SLOT, add_lora_cpu, kmajor, plan
from kernels.metadata import LoraBatchMeta
from kernels.ops import add_lora
from kernels.reference import expand_ref, shrink_ref


def make(slots, widths=(48, 16, 16), hidden=40, num_slots=6, max_rank=16, ranks=None, dtype=torch.float32,
         seed=0, padding=0.0):
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [max_rank] * num_slots
    a = [torch.randn(num_slots, max_rank, hidden, generator=g).to(dtype) for _ in widths]
    b = [torch.randn(num_slots, w, max_rank, generator=g).to(dtype) for w in widths]
    for s, r in enumerate(ranks):  # past the real rank: A may hold anything (NaN here), B finite values
        for t in a:
            t[s, r:] = padding
        for t in b:
            t[s, :, r:] = 0
    x = torch.randn(len(slots), hidden, generator=g).to(dtype)
    y = torch.randn(len(slots), sum(widths), generator=g).to(dtype)
    meta = LoraBatchMeta.build(torch.tensor(slots), ranks)
    return x, y, a, b, meta


def reference(x, y, a, b, meta, scale=None):
    out = y.clone()
    expand_ref(out, shrink_ref(x, a, meta), b, meta, scale)
    return out


@pytest.mark.parametrize("slots", [
    [0, 1, 2, 3, 4, 5], [3, -1, 3, 0, -1, 5, 0, 3], [2], [-1, 1, 1, -1], [5, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 5],
    [4, 4, 5, 5, 5], [1, 5],
])
@pytest.mark.parametrize("widths", [(48, 16, 16), (32,), (56, 56)])
@pytest.mark.parametrize("ranks", [None, [1, 4, 16, 8, 2, 16]])
def test_dispatched_cpu_path_matches_reference(slots, widths, ranks):
    x, y, a, b, meta = make(slots, widths, ranks=ranks, padding=float("nan"))
    expected = reference(x, y, a, b, meta)
    got = y.clone()
    add_lora(got, x, a, b, meta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    base_rows = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base_rows], y[base_rows])  # base-model tokens untouched


def kmajor_stacks(a):
    """The same A slices as views of one [S, in, n * R] buffer, the way LoraSlots allocates them on CPU."""
    n, (S, R, K) = len(a), a[0].shape
    buf = torch.empty(S, K, n * R, dtype=a[0].dtype)
    views = tuple(buf[:, :, i * R:(i + 1) * R].transpose(1, 2) for i in range(n))
    for view, t in zip(views, a, strict=True):
        view.copy_(t)
    return buf, views


def transposed_b(b):
    """B held as [S, R, out] (the CPU layout), seen as [S, out, R]."""
    return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in b)


LAYOUTS = {
    "grouped view": [0, 0, 1, 1, 2, 2],                 # in slot order, equal counts: x and y in place
    "grouped gather": [2, 3, 3, 2],                    # out of order
    "grouped holes": [0, 0, 2, 2, -1],                 # slot 1 missing from the spanned range
    "grouped uneven": [-1, 0, 0, 0, 1],                # in order, unequal counts
    "segments in place": [-1] * 3 + [1] * 40 + [4] * 35,
    "segments gather": [1, 4] * 40,
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ranks", [None, [3, 16, 5, 16, 1, 2]])
@pytest.mark.parametrize("adjacent", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_layout_matches_reference(layout, ranks, adjacent, dtype):
    slots = LAYOUTS[layout]
    x, y, a, b, meta = make(slots, ranks=ranks, padding=float("nan"), dtype=dtype)
    p = plan(meta)
    assert p.grouped == layout.startswith("grouped")
    assert (p.lora_rows is not None) == (layout in ("grouped view", "segments in place"))
    a_t = None
    if adjacent:
        a_t, a = kmajor_stacks(a)
        b = transposed_b(b)
        assert kmajor(a) is not None
    else:
        assert kmajor(a) is None
    got = y.clone()
    add_lora_cpu(got, x, a, b, meta, a_kmajor=a_t)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got.float(), reference(x, y, a, b, meta).float(), **tol)
    base_rows = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base_rows], y[base_rows])


@pytest.mark.parametrize("layout", ["grouped view", "grouped gather", "segments in place", "segments gather"])
def test_scale(layout):
    x, y, a, b, meta = make(LAYOUTS[layout])
    scale = torch.tensor([0.5, 2.0, -1.0, 1, 3, 1])
    got = y.clone()
    add_lora_cpu(got, x, a, b, meta, scale)
    torch.testing.assert_close(got, reference(x, y, a, b, meta, scale), rtol=1e-5, atol=1e-4)


def test_layout_choice_is_made_once_per_batch():
    _, _, _, _, decode = make([0, 1, 2, 3])
    assert plan(decode).grouped and plan(decode) is plan(decode)
    _, _, _, _, skewed = make([0] * 20 + [1, 2, 3, 4, 5])  # 6 groups x 20 rows for 25 tokens: wasteful
    assert not plan(skewed).grouped
    _, _, _, _, prefill = make([0] * (MAX_TOKENS_PER_SLOT + 1) + [1] * (MAX_TOKENS_PER_SLOT + 1))
    assert not plan(prefill).grouped
    _, _, _, _, sparse = make([0, 5])  # slots 0..5 spanned for 2 tokens: 6 rows for 2 is over the ratio
    assert not plan(sparse).grouped
