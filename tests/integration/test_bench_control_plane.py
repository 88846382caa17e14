"""bench.control_plane's side-by-side floor: the bare grpcio server answers like the control plane does."""

from __future__ import annotations

from bench.control_plane import cpu_seconds, start_floor, stop, timed_load
from bench.grpc_floor import MANIFEST
from loraplane.client import Client
from loraplane.embedded_redis import free_port


def test_floor_serves_resolve_and_the_load_counts_its_cpu():
    port = free_port()
    proc = start_floor(port)
    try:
        with Client(f"127.0.0.1:{port}", "any-token") as c:
            assert c.resolve_adapter("resolve-3") == MANIFEST
        lat, elapsed, _ = timed_load(proc, f"127.0.0.1:{port}", clients=4, seconds=0.5, rate=200)
        assert 60 <= len(lat) <= 110 and elapsed > 0.3  # paced: about rate * seconds calls
        # Unpaced for a second keeps the server busy for many clock ticks: its CPU shows.
        before = cpu_seconds(proc.pid)
        unpaced, elapsed, cpu_per_call = timed_load(proc, f"127.0.0.1:{port}", clients=4, seconds=1.0, rate=0)
        assert len(unpaced) > len(lat) and cpu_per_call > 0 and cpu_seconds(proc.pid) > before
    finally:
        stop(proc)
    assert proc.returncode == 0
