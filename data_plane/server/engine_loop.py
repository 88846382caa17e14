"""The engine thread: commands in, per-request output deltas out.

The Engine is not thread-safe, so everything that touches it runs here, between steps:
requests added or aborted by the gRPC handlers, and adapters moved from the CPU tier into GPU
slots when a waiting request needs them. Each step is schedule -> run -> postprocess.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from data_plane.engine.engine import Engine
from data_plane.engine.request import RequestOutput
from data_plane.lora.cpu_cache import CpuCache
from data_plane.lora.slot_table import SlotTable
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)
IDLE_WAIT_S = 0.05


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published after every step, for metrics and heartbeats (read from other threads)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    gpu_adapters: tuple[str, ...] = ()
    free_slots: int = 0
    prefix_cache_queries: int = 0   # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0      # of those, found cached (not recomputed)


def _set_exception(future: concurrent.futures.Future, error: Exception) -> None:
    if not future.done():
        try:
            future.set_exception(error)
        except concurrent.futures.InvalidStateError:  # settled meanwhile by another thread
            pass


def _deliver(items: list) -> None:
    for q, out in items:
        q.put_nowait(out)


class EngineLoop:
    def __init__(self, engine: Engine | None, cpu: CpuCache, slots: SlotTable, on_promote: Callable | None = None):
        self.engine = engine
        self.cpu = cpu
        self.slots = slots
        self.on_promote = on_promote  # (key, seconds, evicted key or None), for metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        # Set when a failed step could not even be cleaned up: the thread is gone, and every call
        # and stream gets this error at once instead of waiting for its deadline.
        self.broken: LoraplaneError | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.steps = 0
        self._pending_evictions: set[str] = set()   # engine thread only
        self.stats = EngineStats(free_slots=slots.num_slots)

    def start(self) -> None:
        self._thread.start()

    @classmethod
    def build_and_start(cls, build: Callable[[], Engine], cpu: CpuCache, slots: SlotTable,
                        on_promote: Callable | None = None) -> EngineLoop:
        """Build the engine inside the engine thread, step it there, and return once it is built.

        Why inside: with GNU OpenMP, a thread that starts running parallel torch ops after another
        thread of the process already has pays 2-3x per small op (measured on 2 cores: a 16-row
        oneDNN linear 100 -> 200 us, a decode-sized bmm 25 -> 80 us; large ops are unaffected).
        Built in a helper thread, the engine thread was the second: serving ran ~25% slower than
        the same engine stepped from a process's main thread. A build failure is raised here.
        """
        loop = cls(None, cpu, slots, on_promote)
        built: concurrent.futures.Future = concurrent.futures.Future()

        def build_then_run() -> None:
            try:
                loop.engine = build()
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who re-raises it
                built.set_exception(e)
                return
            built.set_result(None)
            loop._run()

        loop._thread = threading.Thread(target=build_then_run, name="engine-loop", daemon=True)
        loop._thread.start()
        built.result()
        return loop

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(30)

    # ---- called from other threads ----------------------------------------------------------

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Run fn(engine) in the engine thread between steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.broken is None:  # nothing reads the queue once it is set
            self._commands.put((fn, future))
        if self.broken is not None:  # checked again: a command queued as the thread broke is not lost
            _set_exception(future, self.broken)
        return future

    async def acall(self, fn: Callable[[Engine], object]):
        return await asyncio.wrap_future(self.call(fn))

    async def submit(self, prompt, sampling, adapter_key: str | None, request_id: str) -> asyncio.Queue:
        """Queue a request; its RequestOutputs arrive on the returned asyncio queue."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def add(engine: Engine):
            rid = engine.add_request(prompt, sampling, adapter_key, request_id)
            self._streams[rid] = (loop, outputs)
            return rid

        await self.acall(add)
        return outputs

    # ---- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception:  # noqa: BLE001 - one bad batch must not take the replica down
                logger.exception("engine step failed; failing its running requests and carrying on")
                try:
                    self._fail_running()
                except Exception:  # noqa: BLE001 - the engine's state is beyond repair: stop cleanly
                    logger.critical("the engine could not clean up after a failed step; this replica "
                                    "fails every request until it is restarted", exc_info=True)
                    self._break()
                    return
        logger.info("engine loop stopped after %d steps", self.steps)

    def _break(self) -> None:
        """End every stream and pending call with ENGINE_FAILURE, without the engine."""
        self.broken = LoraplaneError(R.ERROR_REASON_ENGINE_FAILURE,
                                     "this replica's engine failed and cannot recover; retry on another replica")
        streams, self._streams = self._streams, {}
        for loop, q in streams.values():
            loop.call_soon_threadsafe(q.put_nowait, self.broken)
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _set_exception(item[1], self.broken)

    def _iteration(self) -> None:
        busy = self.engine.has_unfinished()
        self._drain_commands(block=not busy)
        if self._stop.is_set():
            return
        self._evict_pending()
        self._promote_waiting()
        if not self.engine.has_unfinished():
            self._publish_stats()
            return
        outputs = self.engine.step()
        self.steps += 1
        self._publish_stats()
        if outputs:
            self._dispatch(outputs)
        elif not self.engine.last_step_ran:  # everything waits on adapters or KV: do not spin
            self._drain_commands(block=True)

    def _fail_running(self) -> None:
        """Abort the running requests (freeing their KV and slots) and tell their streams why."""
        error = LoraplaneError(R.ERROR_REASON_ENGINE_FAILURE,
                               "the engine failed while running this request's batch; it was logged, retry")
        for request in list(self.engine.scheduler.running):
            self._fail(request.request_id, error)
        self._publish_stats()

    def fail_streams(self, error: LoraplaneError) -> None:
        """Engine thread only: end every submitted request's stream with `error` (the replica stops)."""
        for request_id in list(self._streams):
            self._fail(request_id, error)
        self._publish_stats()

    def _fail(self, request_id: str, error: LoraplaneError) -> None:
        """Abort a request and end its stream with `error` instead of an ABORT output."""
        self.engine.abort(request_id)
        target = self._streams.pop(request_id, None)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, error)

    def _publish_stats(self) -> None:
        sched = self.engine.scheduler
        blocks = self.engine.blocks
        self.stats = EngineStats(
            running=len(sched.running), waiting=len(sched.waiting),
            kv_usage=blocks.num_used / blocks.num_blocks if blocks.num_blocks else 0.0,
            running_adapters=tuple(sorted(self.engine.adapters_in_use())),
            waiting_adapters=tuple(self.engine.waiting_adapters()),
            gpu_adapters=tuple(self.slots.keys()), free_slots=self.slots.free_slots,
            prefix_cache_queries=blocks.prefix_queries, prefix_cache_hits=blocks.prefix_hits)

    def _drain_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001 - handed to the caller, who re-raises it
                    future.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        # One wake-up per event loop per step, not one per request: at 32 streams the per-output
        # call_soon_threadsafe cost was a measurable share of the serving overhead.
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            loop, q = target
            by_loop.setdefault(loop, []).append((q, out))
            if out.finished:
                del self._streams[out.request_id]
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)
        for key in self.engine.adapters_in_use():
            self.slots.touch(key)

    def _promote_waiting(self) -> None:
        # Oldest waiting request first, and never evict what an older waiting request needs: with
        # more adapters waiting than free slots, each promotion used to evict the adapter placed
        # just before it in the same pass (measured: 1.6 slot loads per request at 1,000 adapters).
        keep = set(self.engine.adapters_in_use())
        wanted = dict.fromkeys(r.adapter for r in self.engine.scheduler.waiting if r.adapter is not None)
        for key in wanted:
            if self.slots.slot_of(key) is None:
                try:
                    placed = self.promote(key, keep)
                except LoraplaneError as e:
                    # No slot can ever hold it: its requests fail now rather than wait for their
                    # deadline, and the adapters queued after it still get their slots.
                    logger.warning("adapter %s cannot be loaded into a slot; failing its requests: %s", key, e)
                    for request in [r for r in self.engine.scheduler.waiting if r.adapter == key]:
                        self._fail(request.request_id, e)
                    continue
                if not placed:
                    return
            keep.add(key)

    def promote(self, key: str, keep: set[str] | None = None) -> bool:
        """Move `key` from the CPU tier into a GPU slot, evicting none of `keep` (default: the adapters
        running requests use); False if no slot can be freed now. Raises the LoraplaneError of an
        adapter that no slot can hold (rank above max_lora_rank, shapes that do not fit)."""
        if self.slots.slot_of(key) is not None:
            return True
        adapter = self.cpu.get(key)
        if adapter is None:
            logger.warning("adapter %s is wanted on the GPU but not in the CPU tier", key)
            return True  # not blocking the others: its request will get it once fetched again
        self.engine.check_adapter(adapter)  # before a victim is evicted for it
        choice = self.slots.choose(keep if keep is not None else self.engine.adapters_in_use())
        if choice is None:
            return False
        slot, victim = choice
        t0 = time.perf_counter()
        try:
            if victim is not None:
                self.engine.evict_adapter(victim)
                self.slots.removed(victim)
            # The key's version is the weights' sha256, so the key can name the adapter's cached KV:
            # prefixes survive the adapter leaving its slot and coming back.
            self.engine.load_adapter(key, slot, adapter, cache_salt=key.encode())
        except LoraplaneError as e:
            if e.reason != R.ERROR_REASON_CAPACITY_EXHAUSTED:
                raise
            logger.warning("could not load %s into slot %d now: %s", key, slot, e)  # a request holds it
            return False
        self.slots.placed(key, slot)
        if self.on_promote:
            self.on_promote(key, time.perf_counter() - t0, victim)
        return True

    def evict_later(self, key: str) -> bool:
        """Engine thread only: evict `key` now, or as soon as its running requests finish."""
        if self.evict(key):
            return True
        self._pending_evictions.add(key)
        return False

    def _evict_pending(self) -> None:
        for key in list(self._pending_evictions):
            if self.evict(key):
                self._pending_evictions.discard(key)

    def evict(self, key: str) -> bool:
        """Engine thread only: take `key` out of its slot unless running requests use it."""
        if self.slots.slot_of(key) is None:
            return True
        if key in self.engine.adapters_in_use():
            return False
        self.engine.evict_adapter(key)
        self.slots.removed(key)
        return True
