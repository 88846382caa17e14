"""The batched CPU path (kernels/grouped_bmm.py) against the reference, and when it is chosen."""

from __future__ import annotations

import pytest
import torch

from kernels.grouped_bmm import MAX_TOKENS_PER_SLOT, add_lora_grouped, pack
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


@pytest.mark.parametrize("slots", [[0, 1, 2, 3, 4, 5], [2, 3, 3, 2], [0, 0, 0, 1, 1, 1, -1]])
def test_grouped_path_itself(slots):
    x, y, a, b, meta = make(slots, ranks=[3, 16, 5, 16, 1, 2], padding=float("nan"))
    packed = pack(meta)
    assert packed is not None
    got = y.clone()
    add_lora_grouped(got, x, a, b, packed)
    torch.testing.assert_close(got, reference(x, y, a, b, meta), rtol=1e-5, atol=1e-4)


def test_scale_and_bf16():
    x, y, a, b, meta = make([0, 2, 2, 1], dtype=torch.bfloat16)
    scale = torch.tensor([0.5, 2.0, -1.0, 1, 1, 1])
    got = y.clone()
    add_lora_grouped(got, x, a, b, pack(meta), scale)
    torch.testing.assert_close(got.float(), reference(x, y, a, b, meta, scale).float(), rtol=2e-2, atol=5e-2)


def test_layout_choice_is_made_once_per_batch():
    _, _, _, _, decode = make([0, 1, 2, 3])
    assert pack(decode) is not None and pack(decode) is pack(decode)
    _, _, _, _, skewed = make([0] * 20 + [1, 2, 3, 4, 5])  # 6 groups x 20 rows for 25 tokens: wasteful
    assert pack(skewed) is None and pack(skewed) is None
    _, _, _, _, prefill = make([0] * (MAX_TOKENS_PER_SLOT + 1) + [1] * (MAX_TOKENS_PER_SLOT + 1))
    assert pack(prefill) is None
    _, _, _, _, sparse = make([0, 5])  # slots 0..5 spanned for 2 tokens: 6 rows for 2 is over the ratio
    assert pack(sparse) is None
