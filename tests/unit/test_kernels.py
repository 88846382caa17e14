"""Triton multi-LoRA kernels against the torch reference, the custom ops, and the backend switch.

On CPU the Triton kernels run in Triton's interpreter: the launchers pick it for CPU tensors
(kernels.triton_utils.for_device), so these tests need no TRITON_INTERPRET and are immune to which
module imported triton first. test_kernels_bench.py covers the classic TRITON_INTERPRET=1 mode in
a subprocess. With CUDA present the `gpu` twins run the same checks on compiled kernels.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch

from kernels import ops
from kernels.metadata import LoraBatchMeta
from kernels.reference import expand_ref, shrink_ref

triton = pytest.importorskip("triton")

from kernels.expand import expand  # noqa: E402 - after the triton importorskip
from kernels.shrink import shrink  # noqa: E402

_NO_CUDA = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(_NO_CUDA, reason="needs CUDA (compiled Triton)")])]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the largest reference value. 16-bit expand rounds v to B's dtype on GPU.
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _decode(n_tokens: int, n_slots: int, seed: int) -> list[int]:
    """One token per request, slots in random order, some base-only (-1)."""
    rng = random.Random(seed)
    return [rng.randrange(-1, n_slots) for _ in range(n_tokens)]


def _prefill(lens: list[int], slots: list[int]) -> list[int]:
    """Requests of several tokens each; a request's tokens are contiguous, slots out of order."""
    return [s for n, s in zip(lens, slots, strict=True) for _ in range(n)]


@dataclass(frozen=True)
class Case:
    name: str
    token_slots: list[int]
    ranks: list[int]             # real rank of each slot; S = len(ranks)
    hidden: int
    R: int                       # stack (max) rank
    widths: tuple[int, ...]      # output width of each slice

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("decode-1tok", [0], [16], 64, 16, (64,)),
    Case("decode-unsorted-mixed-ranks", _decode(12, 5, 1), [16, 8, 1, 16, 3], 100, 16, (48, 16, 16)),
    Case("decode-rank1", _decode(6, 2, 2), [1, 1], 33, 1, (24,)),
    Case("decode-rank128", _decode(5, 3, 3), [128, 64, 7], 48, 128, (40, 40)),
    Case("decode-16-slots", _decode(40, 16, 4), [random.Random(5).randint(1, 16) for _ in range(16)],
         64, 16, (16, 16)),
    Case("prefill-3req", _prefill([17, 9, 30], [2, -1, 0]), [32, 8, 24], 96, 32, (64, 16, 16)),
    Case("prefill-and-decode", _prefill([20, 1, 1, 1, 12], [1, 1, 0, -1, 3]), [8, 16, 4, 16],
         80, 16, (32,)),
    Case("llama-like-qkv", _decode(8, 4, 7), [16, 16, 8, 16], 512, 16, (512, 128, 128)),
    Case("all-base", [-1, -1, -1], [16], 32, 16, (16,)),
    Case("rank-over-stack", _decode(4, 1, 6) + [0], [32], 40, 16, (24,)),  # meta rank clamped to R
]
SMALL_BLOCKS = dict(block_m=16, block_n=16, block_k=16)


@dataclass
class Batch:
    x: torch.Tensor
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    y: torch.Tensor
    meta: LoraBatchMeta


def make_batch(case: Case, dtype: torch.dtype, device: str, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    T, S, K, R = len(case.token_slots), len(case.ranks), case.hidden, case.R

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).to(device)

    # A strided x and y (views into wider buffers), as a fused qkv output or a sliced input is.
    x = rand(T, K + 8)[:, 3:3 + K]
    a = [rand(S, R, K, std=K ** -0.5) for _ in case.widths]
    b = [rand(S, w, R, std=R ** -0.5) for w in case.widths]
    y = rand(T, sum(case.widths) + 8)[:, 8:8 + sum(case.widths)]
    # NaN in the padding past each slot's real rank: a kernel that reads it fails loudly. Expand
    # may read B up to the next multiple of 8 (16-byte loads), so there it is zero, as the engine
    # keeps it.
    for slot, rank in enumerate(case.ranks):
        for t in a:
            t[slot, rank:] = float("nan")
        for t in b:
            t[slot, :, rank:] = 0.0
            t[slot, :, -(-rank // 8) * 8:] = float("nan")
    # Base-only tokens' inputs must not be read either.
    base_rows = torch.tensor(case.token_slots) < 0
    x[base_rows.to(device)] = float("nan")
    meta = LoraBatchMeta.build(torch.tensor(case.token_slots, device=device), case.ranks)
    return Batch(x, a, b, y, meta)


def _close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out, ref = out.float().cpu(), ref.float().cpu()
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * max(ref.abs().max().item(), 1.0))


def _shrink(batch: Batch, **kw) -> torch.Tensor:
    return shrink(batch.x, batch.a, *batch.meta.kernel_args, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", ["auto", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_shrink_matches_reference(case, dtype, blocks, device):
    batch = make_batch(case, dtype, device)
    kw = dict(SMALL_BLOCKS, split_k=3) if blocks == "small" else {}
    v = _shrink(batch, **kw)
    ref = shrink_ref(batch.x, batch.a, batch.meta)
    assert v.shape == ref.shape and v.dtype == torch.float32
    _close(v, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split_k", [1, 2, 3, 7, None])
def test_shrink_split_k(split_k, device):
    """K splits that don't divide the hidden size, and the device-filling default."""
    batch = make_batch(CASES[1], torch.float32, device)
    v = _shrink(batch, split_k=split_k, block_k=16)
    _close(v, shrink_ref(batch.x, batch.a, batch.meta), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", ["auto", "small"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_expand_matches_reference(case, dtype, blocks, device):
    batch = make_batch(case, dtype, device)
    v = shrink_ref(batch.x, batch.a, batch.meta).to(device)
    before = batch.y.clone()
    ref = batch.y.clone()
    expand_ref(ref, v, batch.b, batch.meta)
    expand(batch.y, v, batch.b, *batch.meta.kernel_args, **(SMALL_BLOCKS if blocks == "small" else {}))
    _close(batch.y, ref, dtype)
    base = torch.tensor(case.token_slots, device=device) < 0
    assert torch.equal(batch.y[base], before[base]), "rows of slot -1 tokens changed"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_scale(dtype, device):
    case = CASES[5]
    batch = make_batch(case, dtype, device)
    scale = torch.tensor([0.5, 2.0, -1.25], device=device)
    v = shrink_ref(batch.x, batch.a, batch.meta)
    ref = batch.y.clone()
    expand_ref(ref, v, batch.b, batch.meta, scale)
    expand(batch.y, v, batch.b, *batch.meta.kernel_args, scale)
    _close(batch.y, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_add_lora_backends(case, backend, device, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, backend)
    dtype = torch.bfloat16
    batch = make_batch(case, dtype, device)
    before = batch.y.clone()
    ref = batch.y.clone()
    expand_ref(ref, shrink_ref(batch.x, batch.a, batch.meta), batch.b, batch.meta)
    ops.add_lora(batch.y, batch.x, tuple(batch.a), tuple(batch.b), batch.meta)
    _close(batch.y, ref, dtype)
    base = torch.tensor(case.token_slots, device=device) < 0
    assert torch.equal(batch.y[base], before[base])


def test_backend_env(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    assert (ops.backend_for(cpu), ops.backend_for(cuda)) == ("torch", "triton")
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    assert ops.backend_for(cpu) == "triton"
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")
    assert ops.backend_for(cuda) == "torch"
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="auto, torch or triton"):
        ops.backend_for(cpu)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_dispatch_follows_env(backend, monkeypatch):
    """The env var decides, at call time, which implementation the custom ops run."""
    import kernels.expand
    import kernels.shrink

    calls = []
    for mod, name in ((kernels.shrink, "shrink"), (kernels.expand, "expand")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: (
            calls.append(_name), _real(*a, **k))[1])
    monkeypatch.setenv(ops.BACKEND_ENV, backend)
    batch = make_batch(CASES[1], torch.float32, "cpu")
    ops.add_lora(batch.y, batch.x, batch.a, batch.b, batch.meta)
    assert calls == (["shrink", "expand"] if backend == "triton" else [])


def test_cpu_tensors_run_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from kernels.shrink import _shrink_kernel
    from kernels.triton_utils import for_device

    assert isinstance(for_device(_shrink_kernel, torch.device("cpu")), InterpretedFunction)
    if isinstance(_shrink_kernel, InterpretedFunction):  # TRITON_INTERPRET=1 before the import
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 with CUDA tensors"):
            for_device(_shrink_kernel, torch.device("cuda"))
    else:
        assert for_device(_shrink_kernel, torch.device("cuda")) is _shrink_kernel


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ops_opcheck(backend, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, backend)
    batch = make_batch(CASES[1], torch.float32, "cpu")
    args = batch.meta.kernel_args
    torch.library.opcheck(torch.ops.loraplane.lora_shrink.default, (batch.x, batch.a, *args))
    v = shrink_ref(batch.x, batch.a, batch.meta)
    torch.library.opcheck(torch.ops.loraplane.lora_expand.default,
                          (batch.y.clone(), v, batch.b, *args, None))
    torch.library.opcheck(torch.ops.loraplane.lora_expand.default,
                          (batch.y.clone(), v, batch.b, *args, torch.rand(5)))


def test_fake_impls_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    batch = make_batch(CASES[5], torch.bfloat16, "cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        v = torch.ops.loraplane.lora_shrink(batch.x, batch.a, *batch.meta.kernel_args)
        torch.ops.loraplane.lora_expand(batch.y, v, batch.b, *batch.meta.kernel_args, None)
    assert v.shape == (3, len(CASES[5].token_slots), 32) and v.dtype == torch.float32


@pytest.mark.parametrize(("fullgraph", "compile_backend"), [(True, "inductor"), (False, "aot_eager")])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile(fullgraph, compile_backend, backend, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, backend)
    torch._dynamo.reset()
    batch = make_batch(CASES[6], torch.float32, "cpu")
    a, b, meta = tuple(batch.a), tuple(batch.b), batch.meta

    def layer(x, y):
        out = y * 2.0
        ops.add_lora(out, x, a, b, meta)
        return out + 1.0

    ref = batch.y * 2.0
    expand_ref(ref, shrink_ref(batch.x, batch.a, meta), batch.b, meta)
    compiled = torch.compile(layer, fullgraph=fullgraph, backend=compile_backend)
    _close(compiled(batch.x, batch.y), ref + 1.0, torch.float32)


def test_metadata_kernel_args_roundtrip():
    case = CASES[1]
    meta = LoraBatchMeta.build(torch.tensor(case.token_slots), case.ranks)
    back = LoraBatchMeta.from_kernel_args(len(case.token_slots), *meta.kernel_args)
    assert torch.equal(back.token_slots, meta.token_slots)
    assert back.slot_counts_list == meta.slot_counts_list
    assert back.slot_ranks_list == meta.slot_ranks_list
    assert back.active_slots_list == meta.active_slots_list


def test_rejects_mismatched_stacks():
    batch = make_batch(CASES[1], torch.float32, "cpu")
    with pytest.raises(ValueError, match="one shape"):
        _shrink(batch.__class__(batch.x, [batch.a[0], batch.a[1][:, :8]], batch.b, batch.y,
                                batch.meta))
    with pytest.raises(ValueError, match="do not fit"):
        expand(batch.y[:, :40], shrink_ref(batch.x, batch.a, batch.meta), batch.b,
               *batch.meta.kernel_args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_takes_slices_with_strides_of_their_own(dtype):
    """B stacks laid out [S, R, out] and viewed as [S, out, R] (LoraLinear's CPU layout, what
    LORAPLANE_LORA_BACKEND=triton hands the interpreter): under GQA each slice's rank stride is its
    own width, which the expand once refused ("slices need the same inner strides")."""
    case = CASES[1]  # widths (48, 16, 16), mixed ranks, unsorted
    batch = make_batch(case, dtype, "cpu")
    b = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in batch.b]
    assert len({t.stride()[1:] for t in b}) == 2  # q's inner strides differ from k's and v's
    v = shrink_ref(batch.x, batch.a, batch.meta)
    ref = batch.y.clone()
    expand_ref(ref, v, b, batch.meta)
    expand(batch.y, v, b, *batch.meta.kernel_args)
    _close(batch.y, ref, dtype)


def test_fp16_expand_keeps_the_fp32_range_of_v():
    # v past fp16's 65504, B small enough that the delta is finite: the reference's answer.
    meta = LoraBatchMeta.build(torch.tensor([0, 0]), [16])
    v = torch.full((1, 2, 16), 76800.0)
    b = [torch.full((1, 32, 16), 1e-3, dtype=torch.float16)]
    y, ref = (torch.zeros(2, 32, dtype=torch.float16) for _ in range(2))
    expand_ref(ref, v, b, meta)
    expand(y, v, b, *meta.kernel_args)
    assert torch.isfinite(ref).all() and torch.isfinite(y).all()
    _close(y, ref, torch.float16)


def test_expand_refuses_operands_that_do_not_fit():
    batch = make_batch(CASES[1], torch.float32, "cpu")
    v = shrink_ref(batch.x, batch.a, batch.meta)
    args = batch.meta.kernel_args
    with pytest.raises(ValueError, match="do not fit together"):
        expand(batch.y, v[:, :1], batch.b, *args)  # v for one token, y for twelve: read past v's end
    with pytest.raises(ValueError, match="float32"):
        expand(batch.y, v.half(), batch.b, *args)
    with pytest.raises(ValueError, match="one per slot"):
        expand(batch.y, v, batch.b, *args, torch.ones(1))  # 5 slots
    with pytest.raises(ValueError, match="one per slot"):
        expand(batch.y, v, batch.b, *args, torch.ones(5, dtype=torch.float64))


def test_slice_tables_of_a_deep_model_stay_cached():
    """Four tables per layer, looked up in the same order every step: an 80-layer model's 320 must
    all stay cached, or every step rebuilds each one (a host-to-device copy, and an error under
    CUDA graph capture)."""
    from kernels.triton_utils import int64_table

    def table(j):  # the j-th projection's two slices: distinct addresses
        return int64_table([[(1 << 40) + 1024 * j + 64 * i, 16, 0, 256, 1, 16] for i in range(2)],
                           torch.device("cpu"))

    first = [table(j) for j in range(320)]
    again = [table(j) for j in range(320)]
    assert all(a is b for a, b in zip(first, again, strict=True))
