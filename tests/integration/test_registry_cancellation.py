"""A task cancelled inside a registry call stops, on real Redis.

redis-py 8.1 can swallow a cancel() that lands inside a command: the command returns normally and
the task runs on. The control plane's background loops (orphan sweep, resolve-cache events) then
outlived SIGTERM; control_plane/registry.py re-raises the cancellation the task still records.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from control_plane.registry import Registry

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is Python 3.11+")


def test_cancel_inside_registry_calls_always_stops_the_task(redis_url, redis_prefix):
    async def main() -> dict[str, int]:
        registry = Registry.from_url(redis_url, redis_prefix)
        outcomes = {"cancelled": 0, "ran on": 0}

        async def loop():
            while True:
                await registry.names_in("PENDING")
                await registry.last_event_id()

        try:
            for i in range(60):
                task = asyncio.create_task(loop())
                await asyncio.sleep(0.0005 * (i % 5))  # land the cancel at different points of the calls
                task.cancel()
                done, _ = await asyncio.wait([task], timeout=2.0)
                if done and task.cancelled():
                    outcomes["cancelled"] += 1
                else:
                    outcomes["ran on"] += 1
                    task.cancel()
                    await asyncio.wait([task], timeout=2.0)
        finally:
            await registry.close()
        return outcomes

    assert asyncio.run(main()) == {"cancelled": 60, "ran on": 0}
