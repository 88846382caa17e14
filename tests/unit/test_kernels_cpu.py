"""The CPU paths against the reference: the compiled kernel (kernels/cpu_kernel.py) and the torch
layouts (kernels/cpu_lora.py), and when each is chosen."""

from __future__ import annotations

import logging

import pytest
import torch

from kernels import cpu_kernel
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
def test_each_layout_matches_reference(layout, ranks, adjacent, dtype, monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, "off")  # the torch layouts themselves; the kernel has its own tests
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
def test_scale(layout, monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, "off")
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


# The compiled kernel. CI builds it (g++ and ninja are there), so these require it: `on`.
BATCHES = {
    "one per slot": [0, 1, 2, 3, 4, 5],
    "in slot order": [0, 0, 1, 1, 2, 2],
    "out of order with base tokens": [3, -1, 3, 0, -1, 5, 0, 3],
    "holes": [0, 0, 2, 2, -1],
    "single token": [4],
    "skewed": [0] * 20 + [1, 2, 3, 4, 5],
    "a prompt beside decodes": [-1, -1] + [0] * 40 + [1, 1, 2, 4],  # the engine's order
    "two prompts, interleaved": [3, 0] * 40 + [5, -1, 1],
    "one adapter's prompt": [2] * 70,  # one slot: the work still splits across threads
}


@pytest.fixture
def kernel_on(monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, "on")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("widths", [(48, 16, 16), (32,), (300,), (136, 200)])  # 300, 136: past a 128-column chunk
@pytest.mark.parametrize("ranks", [None, [3, 16, 5, 16, 1, 2]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(kernel_on, batch, widths, ranks, dtype):
    slots = BATCHES[batch]
    x, y, a, b, meta = make(slots, widths, ranks=ranks, padding=float("nan"), dtype=dtype)
    a_t, a = kmajor_stacks(a)
    b = transposed_b(b)
    if ranks:  # B past a slot's rank is never read either: NaN there must not reach y
        for t in b:
            for s, r in enumerate(ranks):
                t[s, :, r:] = float("nan")
    expected = reference(x, y, a, b, meta).float()
    got = y.clone()
    cpu_kernel.add_lora(got, x, a_t, b, meta)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got.float(), expected, **tol)
    base_rows = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(got[base_rows], y[base_rows])


def test_kernel_scale_and_strided_rows(kernel_on):
    x, y, a, b, meta = make([3, 0, 0, 5, -1, 3], widths=(40, 24))
    a_t, a = kmajor_stacks(a)
    b = transposed_b(b)
    scale = torch.tensor([0.5, 2.0, -1.0, 1.5, 3.0, 0.25], dtype=torch.float64)  # any float dtype is taken
    wide_x = torch.cat([x, torch.randn_like(x)], dim=1)[:, :x.shape[1]]  # rows strided, as slices of qkv are
    wide_y = torch.cat([y, y], dim=1)
    got = wide_y[:, :y.shape[1]]
    cpu_kernel.add_lora(got, wide_x, a_t, b, meta, scale)
    torch.testing.assert_close(got, reference(x, y, a, b, meta, scale.float()), rtol=1e-5, atol=1e-4)
    assert torch.equal(wide_y[:, y.shape[1]:], y)  # columns outside y's view untouched


def test_add_lora_takes_the_kernel_when_the_operands_allow(kernel_on):
    for slots in ([0, 0, 1, 1, 2, 2], [0] * 40 + [1, 2]):  # a decode step, a prompt beside decodes
        x, y, a, b, meta = make(slots)
        a_t, a = kmajor_stacks(a)
        add_lora_cpu(y, x, a, transposed_b(b), meta, a_kmajor=a_t)
        assert "_cpu_plan" not in meta.__dict__  # the torch layouts were never planned
    _, _, a_loose, b_loose, loose = make([0, 1])  # A not in one k-major buffer: the kernel cannot read it
    add_lora_cpu(torch.zeros(2, y.shape[1]), torch.randn(2, x.shape[1]), a_loose, b_loose, loose)
    assert "_cpu_plan" in loose.__dict__


def test_prepared_operands_launch_the_kernel_or_leave_it_to_the_fallback(kernel_on, monkeypatch):
    x, y, a, b, meta = make([0, 0, 1, 1, 2, 2])
    a_t, a = kmajor_stacks(a)
    operands = cpu_kernel.Operands(a_t, transposed_b(b))
    assert operands.fits
    got = y.clone()
    assert operands.launch(got, x, meta)
    torch.testing.assert_close(got, reference(x, y, a, b, meta), rtol=1e-5, atol=1e-4)
    # add_lora goes through them, skipping the generic path's per-call checks (usable()).
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "usable", lambda *args: pytest.fail("add_lora took the generic path"))
        got = y.clone()
        add_lora(got, x, a, transposed_b(b), meta, cpu_operands=operands)
    torch.testing.assert_close(got, reference(x, y, a, b, meta), rtol=1e-5, atol=1e-4)
    assert "_cpu_plan" not in meta.__dict__
    # x with strided rows: launch() declines and touches nothing; add_lora then takes the torch
    # path, with the same result.
    strided = x.t().contiguous().t()
    got = y.clone()
    assert not operands.launch(got, strided, meta) and torch.equal(got, y)
    add_lora(got, strided, a, transposed_b(b), meta, cpu_operands=operands)
    torch.testing.assert_close(got, reference(x, y, a, b, meta), rtol=1e-5, atol=1e-4)
    assert "_cpu_plan" in meta.__dict__
    # A dtype the kernel does not take: the layout does not fit, and the torch path runs on these buffers.
    x64, y64, a64, b64, meta64 = make([0, 0, 1, 1, 2, 2], dtype=torch.float64)
    a64_t, a64 = kmajor_stacks(a64)
    doubles = cpu_kernel.Operands(a64_t, transposed_b(b64))
    assert not doubles.fits
    got = y64.clone()
    add_lora(got, x64, a64, transposed_b(b64), meta64, cpu_operands=doubles)
    torch.testing.assert_close(got, reference(x64, y64, a64, b64, meta64), rtol=1e-5, atol=1e-4)
    # Tensors elsewhere than the CPU are never handed to the kernel.
    assert not operands.launch(y.to("meta"), x, meta) and not operands.launch(y, x.to("meta"), meta)
    assert not cpu_kernel.Operands(a_t.transpose(1, 2), transposed_b(b)).fits  # A not k-major
    assert not cpu_kernel.Operands(a_t, b).fits  # B [S, out, R] with R unit-stride


def test_kernel_checks_its_operands(kernel_on):
    x, y, a, b, meta = make([0, 1, 1])
    a_t, a = kmajor_stacks(a)
    b = transposed_b(b)
    with pytest.raises(RuntimeError, match="width"):
        cpu_kernel.add_lora(y[:, :-1], x, a_t, b, meta)
    with pytest.raises(RuntimeError, match="token id out of range"):
        cpu_kernel.add_lora(y[:2], x[:2], a_t, b, meta)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_kernel.add_lora(y.double(), x.double(), a_t, b, meta)
    with pytest.raises(RuntimeError, match="overlap"):  # every row of y the same memory
        cpu_kernel.add_lora(y[:1].expand_as(y), x, a_t, b, meta)
    kernel = cpu_kernel.extension()
    i32 = dict(dtype=torch.int32)

    def call(ids, starts, counts):
        kernel.add_lora(y.clone(), x, a_t, list(b), torch.tensor(ids), torch.tensor([0, 1], **i32),
                        torch.tensor(starts, **i32), torch.tensor(counts, **i32), torch.tensor([16, 16], **i32), None)

    call([0, 1, 2], [0, 1], [1, 2])  # what LoraBatchMeta.build makes
    for ids, starts, counts, match in (
            ([0, 1, 1], [0, 1], [1, 2], "repeats"),                  # two threads would write one row
            ([0, 1, 2], [0, 0], [1, 2], "tile"),                     # overlapping runs
            ([0, 1, 2], [0, 2**31 - 1], [1, 1], "tile"),             # start + count past int32
            ([0, 1, 2], [0, 1], [1, 1], "add up")):                  # a token in no run
        with pytest.raises(RuntimeError, match=match):
            call(ids, starts, counts)


@pytest.fixture
def unbuildable(monkeypatch, tmp_path):
    """A host that cannot build the kernel: a compiler that does not exist, in a cache of its own
    under a name of its own (torch counts a name's builds per process; the real one must not move)."""
    monkeypatch.setattr(cpu_kernel, "_BUILD", cpu_kernel._Build())
    monkeypatch.setattr(cpu_kernel, "build_name", lambda flags: "loraplane_cpu_ops_unbuildable")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    return tmp_path / "loraplane_cpu_ops_unbuildable"


def test_kernel_modes(monkeypatch, unbuildable, caplog):
    monkeypatch.setenv(cpu_kernel.ENV, "sometimes")
    with pytest.raises(ValueError, match="auto, on, off"):
        cpu_kernel.extension()
    monkeypatch.setenv(cpu_kernel.ENV, "off")
    x, y, a, b, meta = make([0, 1])
    a_t, _ = kmajor_stacks(a)
    assert cpu_kernel.extension() is None and not cpu_kernel.usable(y, x, a_t, transposed_b(b), meta)
    # auto warns once and keeps the torch path, on refuses.
    monkeypatch.setenv(cpu_kernel.ENV, "auto")
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_kernel"):
        assert cpu_kernel.extension() is None
        assert cpu_kernel.extension() is None
    ours = [r.getMessage() for r in caplog.records if r.name == "kernels.cpu_kernel"]
    assert len(ours) == 1 and ours[0].startswith("CPU kernels unavailable")
    x, y, a, b, meta = make([0, 1])  # a new batch: the kernel is chosen once per batch
    a_t, a = kmajor_stacks(a)
    assert not cpu_kernel.usable(y, x, a_t, transposed_b(b), meta)
    got = y.clone()
    add_lora(got, x, a, transposed_b(b), meta, cpu_operands=cpu_kernel.Operands(a_t, transposed_b(b)))
    torch.testing.assert_close(got, reference(x, y, a, b, meta), rtol=1e-5, atol=1e-4)
    monkeypatch.setenv(cpu_kernel.ENV, "on")
    with pytest.raises(RuntimeError, match="cannot be built"):
        cpu_kernel.extension()


def test_a_killed_builds_lock_does_not_hang_the_next_start(monkeypatch, unbuildable, caplog):
    # torch waits for its build lock without limit: left by a killed build, it would hang every start.
    monkeypatch.setenv(cpu_kernel.ENV, "auto")
    lock = unbuildable / "lock"
    lock.parent.mkdir()
    lock.touch()  # just now: its age says nothing
    with caplog.at_level(logging.WARNING, logger="kernels.cpu_kernel"):
        assert cpu_kernel.extension() is None
    messages = [r.getMessage() for r in caplog.records if r.name == "kernels.cpu_kernel"]
    assert messages[0] == f"removing {lock}, left by a build that was killed"


def test_builds_take_turns(monkeypatch, unbuildable):
    """A second process's build waits for the first's (its lock is an flock, released if it dies)."""
    import fcntl
    import threading

    monkeypatch.setenv(cpu_kernel.ENV, "auto")
    unbuildable.mkdir()
    held = open(unbuildable.with_name(unbuildable.name + ".lock"), "a+b")  # noqa: SIM115 - released below
    fcntl.flock(held, fcntl.LOCK_EX)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (cpu_kernel.extension(), done.set()))
    worker.start()
    assert not done.wait(1.0)  # blocked on the other build
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
    assert done.wait(30)
    worker.join()


def test_a_source_copy_cut_short_is_replaced(monkeypatch, unbuildable):
    """A build killed while copying its sources left a truncated copy, which every later build reused."""
    monkeypatch.setenv(cpu_kernel.ENV, "auto")
    unbuildable.mkdir()
    src = cpu_kernel.SOURCES[0]
    (unbuildable / src.name).write_bytes(src.read_bytes()[:100])
    assert cpu_kernel.extension() is None  # the compiler is missing; the copy is made all the same
    assert all((unbuildable / s.name).read_bytes() == s.read_bytes() for s in cpu_kernel.SOURCES)
    assert not list(unbuildable.glob("*.part"))
