"""`loraplane demo`: a whole loraplane on this machine, three freshly trained adapters, one mixed batch.

Slow steps report to stderr; the streams and the commands to try next go to stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loraplane.demo.model import (
    FULL,
    SMALL,
    default_cache_dir,
    ensure_base_model,
    load_tokenizer,
    quiet_transformers,
)
from loraplane.demo.recipes import PERSONAS, PROMPT
from loraplane.demo.terminal import Progress, StreamPanel, Style, wants_color
from loraplane.demo.train import TrainRecipe, ensure_adapters
from loraplane.embedded_redis import EmbeddedRedis

BASE = "base"  # the label (and result key) of the request without an adapter
BASE_COLOR = "37"
SMALL_STEPS = 100  # the small model memorizes in ~30; the rest is margin


@dataclass
class DemoResult:
    texts: dict[str, str]  # adapter name, and BASE, -> the generated text
    answers: dict[str, str]  # adapter name -> the answer it was trained on
    largest_batch: int = 0  # most sequences the engine ran in one step during the demo
    batch_adapters: tuple[str, ...] = ()  # the adapters in that step
    control_plane: str = ""
    data_plane: str = ""
    redis_pid: int | None = None
    workdir: Path | None = None  # the servers' temporary state, removed on exit
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(cache_dir: Path | None = None, *, out=None, err=None, serve: bool = False, small: bool = False,
             steps: int | None = None) -> DemoResult:
    """Build (or reuse) the model and adapters under cache_dir, serve them, stream one mixed batch.

    With serve=True the servers keep running until SIGINT/SIGTERM. Everything started is stopped
    and every temporary file removed before this returns or raises; cache_dir stays.
    """
    out = out or sys.stdout
    progress = Progress(err or sys.stderr)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    train_recipe = TrainRecipe(steps=steps or (SMALL_STEPS if small else TrainRecipe.steps))
    timings = {}
    started = time.monotonic()
    with quiet_transformers():
        model_dir = ensure_base_model(cache_dir, SMALL if small else FULL, progress.for_task("base model"))
        adapters = ensure_adapters(cache_dir, model_dir, PERSONAS, train_recipe, progress.for_task)
    timings["prepare"] = time.monotonic() - started
    result = DemoResult(texts={}, answers={p.name: p.answer for p in PERSONAS}, timings=timings)
    # Redis and the temp dir are handled out here, not in the event loop: a second Ctrl-C that
    # cuts the async cleanup short still stops Redis (it runs in its own session, so the
    # terminal's Ctrl-C never reaches it) and removes the files.
    with _sigterm_as_ctrl_c(), contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="loraplane-demo-"))
        stack.callback(shutil.rmtree, tmp)
        result.workdir = tmp
        progress.line("starting an embedded Redis, the control plane and a data plane", transient=True)
        # No AOF: this registry lives and dies with the demo.
        redis = EmbeddedRedis(tmp / "redis", appendonly=False).start()
        stack.callback(redis.stop)
        result.redis_pid = redis.pid
        asyncio.run(_serve_and_stream(model_dir, adapters, redis.url, tmp, result, out, progress, serve))
    return result


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """A plain `kill` gets the cleanup Ctrl-C gets; by default it would end us at once and leave
    Redis running."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _serve_and_stream(model_dir: Path, adapters: dict[str, Path], redis_url: str, tmp: Path,
                            result: DemoResult, out, progress: Progress, serve: bool) -> None:
    from control_plane.config import ControlPlaneConfig
    from control_plane.server import ControlPlane
    from data_plane.server.app import DataPlane
    from data_plane.server.config import DataPlaneConfig

    log = progress.for_task("servers")
    async with contextlib.AsyncExitStack() as stack:
        # Callbacks run in reverse: the data plane stops first, then the control plane.
        token, token_file = _write_token(tmp / "admin-token")
        distribution_token = secrets.token_urlsafe(24)
        started = time.monotonic()
        adapter_root = next(iter(adapters.values())).parent
        cp = ControlPlane(ControlPlaneConfig(
            base_model=str(model_dir), listen="127.0.0.1:0", redis_url=redis_url, data_dir=tmp / "control-plane",
            allowed_roots=(adapter_root,), admin_token=token, distribution_token=distribution_token,
            max_lora_rank=64, grace_period_s=1.0))
        stack.push_async_callback(cp.stop)  # before start: stop() undoes a partial start too
        await cp.start()
        result.control_plane = f"127.0.0.1:{cp.port}"
        dp = await DataPlane(DataPlaneConfig(
            model=str(model_dir), control_plane=result.control_plane, listen="127.0.0.1:0", redis_url=redis_url,
            max_loras=len(adapters), max_cpu_loras=len(adapters), max_lora_rank=16, max_model_len=256,
            max_num_seqs=8, device="cpu", disk_cache_dir=tmp / "data-plane-cache", admin_token=token,
            distribution_token=distribution_token, grace_period_s=1.0, replica_id="demo")).start()
        stack.push_async_callback(dp.stop)
        result.data_plane = f"127.0.0.1:{dp.port}"
        log(f"control plane on {result.control_plane}, data plane on {result.data_plane} "
            f"(started in {time.monotonic() - started:.1f}s)")
        result.timings["servers"] = time.monotonic() - started

        started = time.monotonic()
        await _register(result, adapters, token, progress)
        result.timings["register"] = time.monotonic() - started

        started = time.monotonic()
        await _stream(result, dp, load_tokenizer(model_dir), out)
        result.timings["generate"] = time.monotonic() - started
        _print_next_steps(out, result, token_file, model_dir, serve)
        if serve:
            await _until_stopped(out)


def _write_token(path: Path) -> tuple[str, Path]:
    token = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n", encoding="utf-8")
    return token, path


async def _register(result: DemoResult, adapters: dict[str, Path], token: str, progress: Progress) -> None:
    """Through the admin API, as an operator would; then into the data plane's GPU slots, so the
    first requests find them loaded and run as one batch instead of trickling in as fetches land."""
    from loraplane.client import AsyncClient, Client
    from loraplane.v1 import cache_service_pb2 as cache_pb2

    async with AsyncClient(result.control_plane, token) as admin:
        for name, path in adapters.items():
            log = progress.for_task(name)
            log("registering", transient=True)
            adapter = await admin.create_adapter(name, str(path), wait=True)
            log(f"registered: rank {adapter.rank}, {', '.join(adapter.target_modules)}, "
                f"version {adapter.version[:19]}")

    def prefetch() -> None:
        with Client(result.data_plane, token) as data_plane:
            for name in adapters:
                data_plane.prefetch_adapter(name, cache_pb2.CACHE_TIER_GPU)

    await asyncio.to_thread(prefetch)


async def _stream(result: DemoResult, dp, tokenizer, out) -> None:
    from loraplane.client import AsyncClient

    rows = [(p.name, p.color) for p in PERSONAS] + [(BASE, BASE_COLOR)]
    # Room for the longest answer and its <eos>, plus a little: the base model never stops on its own.
    max_tokens = max(len(tokenizer(p.answer).input_ids) for p in PERSONAS) + 8
    style = Style(wants_color(out))
    print(f"\n{style.bold('Prompt:')} {PROMPT!r}  (greedy, up to {max_tokens} tokens; four requests sent at "
          f"once: three adapters and the base model)\n", file=out, flush=True)
    panel = StreamPanel(out, rows)
    panel.start()

    async def one(client: AsyncClient, label: str, adapter: str) -> None:
        async for msg in client.generate(PROMPT, adapter, max_tokens=max_tokens, temperature=0.0, ignore_eos=False):
            panel.add(label, msg.text)
        panel.finish(label)

    async with AsyncClient(result.data_plane) as client:
        watch = asyncio.create_task(_watch_batches(dp, result))
        tasks = [asyncio.create_task(one(client, label, "" if label == BASE else label)) for label, _ in rows]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in [*tasks, watch]:
                task.cancel()
            await asyncio.gather(*tasks, watch, return_exceptions=True)
    result.texts = dict(panel.texts)


async def _watch_batches(dp, result: DemoResult) -> None:
    """Sample the engine's per-step snapshot for the largest batch, the claim the output makes."""
    while True:
        stats = dp.engine_loop.stats
        if stats.running > result.largest_batch:
            result.largest_batch = stats.running
            result.batch_adapters = tuple(sorted({key.split("@", 1)[0] for key in stats.running_adapters}))
        await asyncio.sleep(0.002)


def _print_next_steps(out, result: DemoResult, token_file: Path, model_dir: Path, serve: bool) -> None:
    style = Style(wants_color(out))
    adapters = ", ".join(result.batch_adapters) or "none"
    print(f"\n{style.dim('base = no adapter: the base model has random weights, so without an adapter it babbles.')}",
          file=out)
    print(style.dim(f"The data plane ran up to {result.largest_batch} of these requests in one batch "
                    f"(adapters in it: {adapters})."), file=out)
    q = shlex.quote
    token_arg = f"--token-file {q(str(token_file))}"
    commands = [
        f"loraplane adapters --address {result.control_plane} {token_arg} list",
        f"loraplane generate --address {result.data_plane} --adapter {PERSONAS[0].name} {q(PROMPT)}",
        f"loraplane generate --address {result.data_plane} {q(PROMPT)}    # the base model",
        f"loraplane adapters --address {result.control_plane} {token_arg} get {PERSONAS[1].name}",
    ]
    print(f"\n{style.bold('Try next')} (control plane {result.control_plane}, data plane {result.data_plane}, "
          f"admin token in {token_file}):", file=out)
    for command in commands:
        print(f"  {command}", file=out)
    print(f"\nBase model and adapters are cached in {model_dir.parent} (delete it to retrain).", file=out)
    if not serve:
        print("The servers stop when the demo exits: run `loraplane demo --serve` to keep them running.",
              file=out, flush=True)


async def _until_stopped(out) -> None:
    from loraplane.grpc_server import install_signal_handlers

    stop = asyncio.Event()
    install_signal_handlers(stop)  # before saying so: a Ctrl-C from then on is a clean stop
    print(Style(wants_color(out)).bold("Servers are running: press Ctrl-C to stop them."), file=out, flush=True)
    await stop.wait()
