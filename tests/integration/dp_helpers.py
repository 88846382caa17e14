"""Helpers for the data-plane service tests."""

from __future__ import annotations

import contextlib
import threading
import time


def wait_for(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def hold_engine(loop) -> tuple[threading.Event, threading.Event]:
    """Queue a command that holds the engine thread once it runs, until `release` is set.
    Returns (held, release); `held` is set when the hold starts."""
    held, release = threading.Event(), threading.Event()
    loop.call(lambda _engine: held.set() or release.wait(60))
    return held, release


@contextlib.contextmanager
def engine_held(loop):
    """Hold the engine thread between steps until the block ends; its commands queue up behind it,
    so a test fixes the order the engine sees calls in, instead of racing them."""
    held, release = hold_engine(loop)
    assert held.wait(30)
    try:
        yield
    finally:
        release.set()
