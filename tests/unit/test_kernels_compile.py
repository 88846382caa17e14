"""The kernels compile for an H100 (sm_90) with the launchers' own configs, no GPU needed.

The interpreter runs the kernels' arithmetic but not Triton's compiler, so a construct that only
fails in codegen (a dot shape, a pointer cast, a type mismatch across branches) would first show up
on a GPU. Here each launcher runs on CPU tensors at Llama-3-8B shapes with its launch intercepted;
the captured arguments are compiled ahead of time for sm_90 with the bundled ptxas, and the PTX is
checked for the 16-byte memory accesses the bandwidth targets depend on.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels.expand  # noqa: E402
import kernels.shrink  # noqa: E402
from kernels.metadata import LoraBatchMeta  # noqa: E402

TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.int32: "i32", torch.int64: "i64"}


class _Capture:
    """Stands in for a kernel: records what the launcher would launch it with."""

    def __init__(self, kernel):
        self.kernel, self.launch = kernel, None

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launch = (grid, args, kwargs)
        return record


def _launch(module, fn_name: str, call, monkeypatch):
    kernel = getattr(module, fn_name)
    capture = _Capture(kernel)
    monkeypatch.setattr(module, "for_device", lambda k, device: capture)
    call()
    assert capture.launch is not None, "the launcher did not launch"
    return kernel, capture.launch


def _compile(kernel, args, kwargs, dot_f32=False):
    """Compile the way the JIT specializes: 16-divisible pointers and ints get the hint, 1 is a constant."""
    names = kernel.arg_names
    signature, constants, attrs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(names, args, strict=False)):
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[arg.dtype]
            divisible = arg.data_ptr() % 16 == 0
        elif arg == 1:
            signature[name], constants[name] = "constexpr", 1
            continue
        else:
            signature[name] = "i32" if -2**31 <= arg < 2**31 else "i64"
            divisible = arg % 16 == 0
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in kwargs.items():
        if name in names:
            signature[name], constants[name] = "constexpr", value
    constants["DOT_F32"] = dot_f32  # CUDA tensors never take the interpreter's bf16 workaround
    src = ASTSource(kernel, signature, constants, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": kwargs["num_warps"]})


def _accesses(ptx: str) -> Counter:
    return Counter(re.findall(r"(?:ld|st)\.global(?:\.v\d)?\.b\d+|cp\.async\.c[ag]", ptx))


def _meta(tokens: int, adapters: int, prefill: bool) -> LoraBatchMeta:
    slots = torch.arange(tokens) * adapters // tokens if prefill else torch.arange(tokens) % adapters
    return LoraBatchMeta.build(slots, [16] * adapters)


SHAPES = {  # name: (in, slice widths, tokens, adapters, prefill)
    "qkv-decode-64x16": (4096, (4096, 1024, 1024), 64, 16, False),
    "down-prefill-256x1": (14336, (4096,), 256, 1, True),
    "gate_up-decode-8x4": (4096, (14336, 14336), 8, 4, False),
}


@pytest.mark.parametrize("split_k", [None, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_shrink_compiles_for_sm90(shape, split_k, monkeypatch):
    K, widths, tokens, adapters, prefill = SHAPES[shape]
    meta = _meta(tokens, adapters, prefill)
    x = torch.zeros(tokens, K, dtype=torch.bfloat16)
    a = [torch.zeros(adapters, 16, K, dtype=torch.bfloat16) for _ in widths]
    kernel, (_, args, kwargs) = _launch(
        kernels.shrink, "_shrink_kernel",
        lambda: kernels.shrink.shrink(x, a, *meta.kernel_args, split_k=split_k), monkeypatch)
    ptx = _compile(kernel, args, kwargs).asm["ptx"]
    seen = _accesses(ptx)
    assert not seen["ld.global.b16"], f"2-byte loads of x or A: {seen}"
    assert bool(re.search(r"\b(?:atom|red)\.global", ptx)) == kwargs["ATOMIC"]


@pytest.mark.parametrize("shape", SHAPES)
def test_expand_compiles_for_sm90(shape, monkeypatch):
    K, widths, tokens, adapters, prefill = SHAPES[shape]
    meta = _meta(tokens, adapters, prefill)
    y = torch.zeros(tokens, sum(widths), dtype=torch.bfloat16)
    v = torch.zeros(len(widths), tokens, 16)
    b = [torch.zeros(adapters, w, 16, dtype=torch.bfloat16) for w in widths]
    kernel, (_, args, kwargs) = _launch(
        kernels.expand, "_expand_kernel",
        lambda: kernels.expand.expand(y, v, b, *meta.kernel_args), monkeypatch)
    assert kwargs["ALIGNED"] and kwargs["B_VEC"]
    seen = _accesses(_compile(kernel, args, kwargs).asm["ptx"])
    assert not seen["ld.global.b16"] and not seen["st.global.b16"], f"2-byte accesses to B or y: {seen}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_and_scale_compile_for_sm90(dtype, monkeypatch):
    meta = _meta(12, 3, False)
    x, y = torch.zeros(12, 200, dtype=dtype), torch.zeros(12, 40, dtype=dtype)
    a, b = [torch.zeros(3, 8, 200, dtype=dtype)], [torch.zeros(3, 40, 8, dtype=dtype)]
    kernel, (_, args, kwargs) = _launch(
        kernels.shrink, "_shrink_kernel",
        lambda: kernels.shrink.shrink(x, a, *meta.kernel_args, split_k=4), monkeypatch)
    _compile(kernel, args, kwargs)
    v = torch.zeros(1, 12, 8)
    kernel, (_, args, kwargs) = _launch(
        kernels.expand, "_expand_kernel",
        lambda: kernels.expand.expand(y, v, b, *meta.kernel_args, torch.ones(3)), monkeypatch)
    _compile(kernel, args, kwargs)
