"""Launch plumbing shared by the Triton LoRA kernels (shrink.py, expand.py)."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction


def for_device(kernel, device: torch.device):
    """The kernel to launch on `device`: compiled on CUDA, Triton's interpreter on CPU.

    TRITON_INTERPRET=1 is read when @triton.jit runs, i.e. at import. Choosing per call lets one
    process run compiled kernels on CUDA tensors and interpreted ones on CPU tensors (the CPU twins
    of the GPU tests), whatever was imported first and whether or not the variable is set.
    triton.language's own @jit helpers (tl.zeros, tl.sum, tl.cdiv, ...) were fixed as compiled at
    triton's import, so the kernels call builtins only (tl.full, not tl.zeros).
    """
    if device.type == "cpu":
        return kernel if isinstance(kernel, InterpretedFunction) else _interpreted(kernel.fn)
    if isinstance(kernel, InterpretedFunction):
        # The interpreter copies tensor arguments to the host, but the slice tables hold device
        # addresses: it would read garbage or crash.
        raise RuntimeError("TRITON_INTERPRET=1 with CUDA tensors is not supported by the LoRA "
                           "kernels; unset it, or run them on CPU tensors")
    return kernel


@functools.cache
def _interpreted(fn) -> InterpretedFunction:
    return InterpretedFunction(fn)


_TABLES: OrderedDict[tuple, torch.Tensor] = OrderedDict()
# Each layer looks up 4 tables a step, always in the same order, so an LRU smaller than the
# model's cycle misses every time (an 80-layer model needs 320). Entries are a few bytes each; the
# cap only bounds tables of engines that are gone.
_TABLES_MAX = 4096


def int64_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """A cached [len(rows), len(row)] int64 tensor on `device`.

    Slices live in separate tensors, so a kernel handling several slices in one launch reads their
    addresses from a table. The stacks are allocated once per engine, so the table is built (one
    host-to-device copy) on first use and reused; a CUDA graph capture must come after that first
    use. The key is the table's content, so a stale entry can never be wrong, only unused.
    """
    key = (device, tuple(tuple(r) for r in rows))
    table = _TABLES.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("LoRA slice table built during CUDA graph capture: run the layer "
                               "once with these stacks before capturing")
        table = torch.tensor(key[1], dtype=torch.int64).to(device)
        _TABLES[key] = table
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: a few waves of SMs on CUDA; 1 in the interpreter,
    where every program is a Python loop iteration and parallelism buys nothing."""
    if device.type != "cuda":
        return 1
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def block_m_for(max_count: int) -> int:
    # tl.dot needs M >= 16; decode (a few tokens per slot) stays at 16 rows so padding is small.
    return min(64, max(16, triton.next_power_of_2(max(max_count, 1))))


def dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 stacks are for testing and debugging: match the torch reference, don't round to tf32.
    # 16-bit operands keep the backend's default.
    return "ieee" if dtype == torch.float32 else None


def dot_in_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether tl.dot must get fp32 operands.

    Triton 3.9's interpreter stores bf16 as uint16 and its tl.dot multiplies those bit patterns as
    integers. Widening to fp32 first gives the tensor cores' exact bf16 products, so the CPU run
    checks the same arithmetic.
    """
    return device.type == "cpu" and dtype == torch.bfloat16


def check_devices(what: str, *tensors: torch.Tensor) -> None:
    """One device for every operand: the kernel reads them all through raw pointers."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{what}: operands on several devices: {sorted(map(str, devices))}")


def check_stacks(stacks: Sequence[torch.Tensor], what: str, same_shape: bool) -> None:
    """Shrink's slices share one shape and set of strides in the kernel; expand's may differ in
    width and strides (its slice table carries them)."""
    first = stacks[0]
    for s in stacks[1:]:
        if same_shape and (s.shape != first.shape or s.stride(0) != first.stride(0)):
            raise ValueError(f"{what}: slices need one shape and strides, got "
                             f"{tuple(s.shape)} vs {tuple(first.shape)}")
        if s.dtype != first.dtype or s.device != first.device:
            raise ValueError(f"{what}: all slices need one dtype and device")
        if s.shape[0] != first.shape[0] or s.shape[2] != first.shape[2]:
            raise ValueError(f"{what}: slices differ in slot count or rank/hidden: "
                             f"{tuple(s.shape)} vs {tuple(first.shape)}")
        if same_shape and (s.stride(1) != first.stride(1) or s.stride(2) != first.stride(2)):
            raise ValueError(f"{what}: slices need the same inner strides")
