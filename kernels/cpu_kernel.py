"""loraplane's compiled CPU ops (kernels/csrc/): build and load them; launch the multi-LoRA one.

The extension holds two ops, a file each: lora_cpu.cpp (multi-LoRA, launched here) and
paged_attention_cpu.cpp (decode attention, launched by kernels/cpu_attention.py); module.cpp binds them.

The torch path (kernels/cpu_lora.py) spends a decode step's LoRA time on dispatching ~10 small ops
per projection, not on LoRA bytes, and a prompt's on rank-16 matmuls that run far below the
GEMM's rate; this kernel does a projection's shrink and expand in one call. The extension is built
on first use by torch's extension builder (needs g++ and ninja) into TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions), once per instruction set, Python, torch and kernel sources: later
processes load the cached library. The references both ops are tested against are in
kernels/reference.py.

LORAPLANE_CPU_KERNEL chooses, for both ops: `auto` (default) builds them and, when they cannot be
built, warns once and keeps the torch paths; `off` never builds them; `on` raises when they cannot be built.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from kernels.metadata import LoraBatchMeta

log = logging.getLogger(__name__)

ENV = "LORAPLANE_CPU_KERNEL"
MODES = ("auto", "on", "off")
SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("module.cpp", "lora_cpu.cpp", "paged_attention_cpu.cpp"))
# The loops are written for the compiler to vectorise; the flags follow the ISA torch itself
# dispatches to, never -march=native, so a cached build cannot carry instructions another host lacks.
# CPU_CAPABILITY picks the matching at::vec::Vectorized (the attention op's exp is torch's own Sleef).
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mprefer-vector-width=512", "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _Build:
    """The one build per process: its module, or the reason there is none (so it is tried once)."""

    def __init__(self) -> None:
        self.module: ModuleType | None = None
        self.error: str | None = None

    def load(self) -> ModuleType | None:
        if self.module is not None or self.error is not None:
            return self.module
        from torch.utils.cpp_extension import get_default_build_root, load  # noqa: PLC0415 - CPU serving only

        isa = torch.backends.cpu.get_cpu_capability()
        flags = ["-O3", "-fopenmp", *ISA_FLAGS.get(isa, [])]
        name = build_name(flags)
        build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
        started = time.perf_counter()
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            with _exclusive(build_dir.with_name(name + ".lock")):
                # torch's builder waits without limit for its own lock file to go, and a build killed
                # midway (OOM, SIGKILL) leaves it behind. Under our lock, which dies with its holder,
                # no other process builds here: a lock file found now is such a leftover.
                leftover = build_dir / "lock"
                if leftover.exists():
                    log.warning("removing %s, left by a build that was killed", leftover)
                    leftover.unlink(missing_ok=True)
                # Built from a copy in the build directory: the build never depends on which checkout
                # or installation the source came from, so they share it instead of rebuilding in turn.
                sources = [build_dir / src.name for src in SOURCES]
                for src, copy in zip(SOURCES, sources, strict=True):
                    # By content, not existence: a copy cut short (killed, disk full) would be reused
                    # by every later build. Renamed into place, so no reader sees half a file.
                    if not copy.is_file() or copy.read_bytes() != src.read_bytes():
                        shutil.copyfile(src, copy.with_suffix(".part"))
                        copy.with_suffix(".part").replace(copy)
                self.module = load(name, [str(c) for c in sources], build_directory=str(build_dir),
                                   extra_cflags=flags)
        except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
            self.error = f"{type(e).__name__}: {e}"
            return None
        log.info("CPU kernels ready (%s) in %.1f s", isa, time.perf_counter() - started)
        return self.module


def build_name(flags: Sequence[str]) -> str:
    """One build per ISA, Python, torch, source and flags: a cached library never meets another ABI,
    CPU or kernel version."""
    isa = torch.backends.cpu.get_cpu_capability()
    version = f"{isa}_py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}"
    digest = hashlib.sha256(b"".join(src.read_bytes() + b"\0" for src in SOURCES)
                            + "\0".join(flags).encode()).hexdigest()[:12]
    return f"loraplane_cpu_ops_{re.sub(r'[^0-9A-Za-z]', '_', version).lower()}_{digest}"


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive flock on `path`: processes building at once take turns; a dead holder's is released."""
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building the CPU kernels (%s)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_BUILD = _Build()


def mode() -> str:
    choice = os.environ.get(ENV, "auto")
    if choice not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {choice!r}")
    return choice


def extension() -> ModuleType | None:
    """The built extension, or None when it is off or cannot be built (`on` raises instead)."""
    choice = mode()
    if choice == "off":
        return None
    first = _BUILD.module is None and _BUILD.error is None
    module = _BUILD.load()
    if module is None:
        if choice == "on":
            raise RuntimeError(f"{ENV}=on but the CPU kernels cannot be built: {_BUILD.error}")
        if first:
            log.warning("CPU kernels unavailable, using torch ops (slower): %s", _BUILD.error)
    return module


def for_batch(meta: LoraBatchMeta) -> ModuleType | None:
    """extension(), looked up once per batch: it spares each of a step's calls the environment and
    build lookups."""
    return meta.once("_cpu_kernel", lambda: extension() if meta.token_slots.device.type == "cpu" else None)


def _layout_fits(a_kmajor: torch.Tensor, b_stacks: Sequence[torch.Tensor]) -> bool:
    dtype = a_kmajor.dtype
    return (dtype in DTYPES and a_kmajor.device.type == "cpu" and a_kmajor.is_contiguous()
            and all(b.stride(1) == 1 and b.dtype == dtype for b in b_stacks))


def _call_fits(y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> bool:
    return (x.dtype == dtype and y.dtype == dtype and x.stride(1) == 1 and y.stride(1) == 1
            and x.device.type == "cpu" and y.device.type == "cpu")


def usable(y: torch.Tensor, x: torch.Tensor, a_kmajor: torch.Tensor | None,
           b_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta) -> bool:
    """Whether add_lora takes these operands (layouts LoraSlots allocates on CPU) and the kernel exists."""
    return (a_kmajor is not None and meta.max_count > 0 and for_batch(meta) is not None
            and _layout_fits(a_kmajor, b_stacks) and _call_fits(y, x, a_kmajor.dtype))


class Operands:
    """One projection's slot buffers, their layout checked once (LoraSlots allocates them once and
    only ever copies into them). A decode step makes four add_lora calls a layer; in the engine,
    the generic path's per-call checks and dispatch took about as long as the kernel itself on a
    small projection (~20 us a call, measured by timing the calls inside a bench.engine_cpu run)."""

    def __init__(self, a_kmajor: torch.Tensor, b_stacks: Sequence[torch.Tensor]):
        self.a_kmajor = a_kmajor               # [S, in, n * R] contiguous
        self.b_stacks = list(b_stacks)         # per slice: [S, out_i, R] with out_i unit-stride
        self.fits = _layout_fits(a_kmajor, self.b_stacks)

    def launch(self, y: torch.Tensor, x: torch.Tensor, meta: LoraBatchMeta,
               scale: torch.Tensor | None = None) -> bool:
        """add_lora with the kernel; False, with y untouched, when it cannot take these operands."""
        module = for_batch(meta)
        if module is None or not self.fits or meta.max_count == 0 or not _call_fits(y, x, self.a_kmajor.dtype):
            return False
        _launch(module, y, x, self.a_kmajor, self.b_stacks, meta, scale)
        return True


def add_lora(
    y: torch.Tensor,                       # [T, sum(out_i)], updated in place
    x: torch.Tensor,                       # [T, in]
    a_kmajor: torch.Tensor,                # [S, in, n * R] contiguous: slot s's slice i is [:, i * R:(i + 1) * R]
    b_stacks: Sequence[torch.Tensor],      # per slice: [S, out_i, R] with out_i unit-stride
    meta: LoraBatchMeta,
    scale: torch.Tensor | None = None,     # [S] per-slot scale, None = 1
) -> None:
    """y[t, slice i] += scale[slot] * (x[t] @ A_i[slot]^T) @ B_i[slot]^T for every token of a slot >= 0.

    A and B past a slot's real rank are never used, whatever they hold. fp32 accumulation; y of
    another dtype gets the delta rounded once, as in the reference.
    """
    module = for_batch(meta)
    if module is None:
        raise RuntimeError(f"the CPU kernels are unavailable (see {ENV})")
    _launch(module, y, x, a_kmajor, list(b_stacks), meta, scale)


def _launch(module: ModuleType, y: torch.Tensor, x: torch.Tensor, a_kmajor: torch.Tensor,
            b_stacks: list[torch.Tensor], meta: LoraBatchMeta, scale: torch.Tensor | None) -> None:
    if scale is not None:
        scale = scale.to(torch.float32).contiguous()
    module.add_lora(y, x, a_kmajor, b_stacks, meta.sorted_token_ids, meta.active_slots,
                    meta.slot_starts, meta.slot_counts, meta.slot_ranks, scale)
