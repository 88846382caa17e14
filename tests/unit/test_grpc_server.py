"""The small helpers both servers share (loraplane/grpc_server.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest

from loraplane.grpc_server import bounded_step, cancel_tasks, check_address, freeze_startup_heap


@pytest.mark.parametrize("good", ["127.0.0.1:0", "0.0.0.0:50051", "[::]:8086", "localhost:65535"])
def test_addresses_that_listen(good):
    check_address("listen", good)


@pytest.mark.parametrize("bad", ["", "8086", ":8086", "host:", "host:http", "host:65536", "host:-1"])
def test_addresses_that_cannot(bad):
    with pytest.raises(ValueError, match="listen must be HOST:PORT"):
        check_address("listen", bad)


def test_freezing_the_start_up_heap_takes_it_out_of_full_collections():
    try:
        frozen = freeze_startup_heap()
        assert frozen > 1000  # at least pytest's and the project's modules
        kept = [object() for _ in range(10)]
        # What is allocated after the freeze stays collectable: a new cycle is freed by a full pass.
        cycle = [kept]
        cycle.append(cycle)
        del cycle
        assert gc.collect(2) >= 1
        # Frozen objects stay out of collections (their count only falls as refcounts free some).
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()


def test_shutdown_steps_are_bounded(caplog):
    """A step that hangs, or a task that ignores cancel(), costs at most its bound, and is logged."""

    async def stubborn():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # what a library that swallows cancellation looks like from outside

    async def main() -> float:
        start = time.perf_counter()
        task = asyncio.create_task(stubborn(), name="stubborn-loop")
        polite = asyncio.create_task(asyncio.sleep(10), name="polite")
        await asyncio.sleep(0)
        await cancel_tasks([task, polite], timeout_s=0.2)
        await bounded_step("a hung step", asyncio.sleep(10), timeout_s=0.2)
        elapsed = time.perf_counter() - start
        assert polite.cancelled() and not task.done()
        task.get_coro().close()  # a coroutine that never returns: drop it without running it again
        return elapsed

    with caplog.at_level(logging.ERROR, logger="loraplane.grpc_server"):
        assert asyncio.run(main()) < 2.0
    messages = [r.getMessage() for r in caplog.records]
    assert any("stubborn-loop ignored cancellation" in m for m in messages)
    assert not any("polite" in m for m in messages)
    assert any("a hung step took over" in m for m in messages)
