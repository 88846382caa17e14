"""The CPU oneDNN linear transform: same results as nn.Linear, applied to every projection or to none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from data_plane.models.onednn_linear import OneDnnLinear, available, use_onednn_linears

pytestmark = pytest.mark.skipif(not available(torch.device("cpu"), torch.float32),
                                reason="this torch has no oneDNN linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 16, 333])
def test_matches_nn_linear(dtype, bias, rows):
    if not available(torch.device("cpu"), dtype):
        pytest.skip(f"this CPU has no oneDNN {dtype} linear (use_onednn_linears leaves it plain)")
    torch.manual_seed(rows)
    linear = nn.Linear(72, 40, bias=bias).to(dtype)
    x = torch.randn(rows, 72 + 5, dtype=dtype)[:, 2:74]  # strided rows, as a slice of a fused output is
    expected = linear(x)
    got = OneDnnLinear(linear)(x)
    assert got.shape == expected.shape and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, expected, **tol)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(8, 8)


def test_swaps_every_linear_including_wrapped_ones():
    model = nn.Sequential(nn.Linear(8, 8), Wrapper(), nn.ReLU(), nn.Linear(8, 4, bias=False))
    x = torch.randn(3, 8)
    expected = model[3](model[2](model[1].base(model[0](x))))
    assert use_onednn_linears(model, torch.device("cpu"), torch.float32) == 3
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model[1].base, OneDnnLinear)
    got = model[3](model[2](model[1].base(model[0](x))))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float16), ("meta", torch.float32)])
def test_left_alone_where_onednn_cannot_serve(device, dtype):
    model = nn.Sequential(nn.Linear(8, 8))
    assert use_onednn_linears(model, torch.device(device), dtype) == 0
    assert type(model[0]) is nn.Linear


def test_bf16_is_swapped_exactly_where_the_cpu_supports_it():
    """An AVX2-only host has no oneDNN bf16 linear: the reorder would raise, so the model stays plain."""
    supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    expected = model(x)
    assert use_onednn_linears(model, torch.device("cpu"), torch.bfloat16) == (1 if supported else 0)
    assert isinstance(model[0], OneDnnLinear if supported else nn.Linear)
    torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)
