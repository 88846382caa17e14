"""Run our real asyncio gRPC servers on loopback in a background thread, for blocking tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import sys
import threading


class ServerThread:
    """Owns an event loop thread; `call(coro)` runs a coroutine on it and returns the result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 60.0):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            self._dump()
            raise

    def _dump(self) -> None:
        """What the loop was doing when a call overran: every thread's stack and every task's."""
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        for task in list(asyncio.all_tasks(self.loop)):  # racy read of another loop: diagnostics only
            task.print_stack(file=sys.stderr)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class RunningControlPlane:
    def __init__(self, config):
        from control_plane.server import ControlPlane

        self.config = config
        self.thread = ServerThread()
        self.plane = self.thread.call(ControlPlane(config).start())
        self.address = f"127.0.0.1:{self.plane.port}"
        self.token = self.plane.admin_token
        self.stopped = False

    def client(self, token: str | None = "admin", **kw):
        from loraplane.client import Client

        return Client(self.address, self.token if token == "admin" else token, **kw)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.thread.call(self.plane.stop())
        self.thread.close()


class RunningDataPlane:
    def __init__(self, config):
        from data_plane.server.app import DataPlane

        self.config = config
        self.thread = ServerThread()
        self.plane = self.thread.call(DataPlane(config).start(), timeout=120)
        self.address = f"127.0.0.1:{self.plane.port}"
        self.stopped = False

    def client(self, token: str | None = None, **kw):
        from loraplane.client import Client

        return Client(self.address, token, **kw)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.thread.call(self.plane.stop(), timeout=120)
        self.thread.close()
