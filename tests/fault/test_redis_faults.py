"""Redis killed mid-traffic, and a data plane cut off from Redis while the registry changes."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from loraplane.client import Client
from loraplane.embedded_redis import EmbeddedRedis
from loraplane.errors import LoraplaneError
from loraplane.v1 import generation_service_pb2 as gen_pb2
from tests.fault.conftest import ADMIN_TOKEN, wait_for, wait_health

PROMPT = [5, 17, 42, 99, 7]
DEADLINE_S = 5.0


def listing(cp) -> list[tuple]:
    with Client(cp.address, ADMIN_TOKEN) as c:
        return [(a.name, a.version, a.state, a.pinned, a.etag) for a in c.list_adapters()]


def generate(dp, adapter: str, n: int = 4, **kw):
    with Client(dp.address, timeout=30) as c:
        ids, last = [], None
        for last in c.generate(PROMPT, adapter, max_tokens=n, ignore_eos=True, **kw):
            ids.extend(last.token_ids)
        return ids, last


def cached(dp) -> dict:
    with Client(dp.address) as c:
        return {a.name: a for a in c.list_cached_adapters().adapters}


class Traffic:
    """Calls both planes in a loop from background threads, recording every outcome and its duration."""

    def __init__(self, cp, dp, adapter: str):
        self.cp, self.dp, self.adapter = cp, dp, adapter
        self.stop = threading.Event()
        self.cp_results: list[tuple[float, float, str]] = []  # (start, seconds, outcome)
        self.dp_results: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._cp, daemon=True), threading.Thread(target=self._dp, daemon=True)]
        for t in self.threads:
            t.start()

    def _cp(self):
        with Client(self.cp.address, ADMIN_TOKEN, timeout=DEADLINE_S) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    c.get_adapter(self.adapter)
                    c.list_adapters_page(page_size=10)
                    outcome = "OK"
                except LoraplaneError as e:
                    outcome = f"{e.code.name}/{e.reason_name}"
                self.cp_results.append((t0, time.monotonic() - t0, outcome))
                time.sleep(0.05)

    def _dp(self):
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                _, last = generate(self.dp, self.adapter)
                outcome = "OK" if last.finish_reason == gen_pb2.FINISH_REASON_LENGTH else "INCOMPLETE"
            except LoraplaneError as e:
                outcome = f"{e.code.name}/{e.reason_name}"
            self.dp_results.append((t0, outcome))
            time.sleep(0.05)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.mark.slow
def test_redis_killed_and_restarted_mid_traffic(spawn, fault_model, fault_root, fault_adapters, prefix, tmp_path):
    redis = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    try:
        cp = spawn.control_plane(fault_model, redis.url, prefix, fault_root)
        dp = spawn.data_plane(fault_model, cp.address, redis.url, prefix, replica="steady")
        cp.wait_serving()
        with Client(cp.address, ADMIN_TOKEN) as c:
            for name in ("a", "b", "c"):
                c.create_adapter(name, str(fault_adapters[name]), wait=True)
            c.pin_adapter("a")
        dp.wait_serving()
        reference = {name: generate(dp, name)[0] for name in ("a", "b")}
        before = listing(cp)

        traffic = Traffic(cp, dp, "b")
        time.sleep(1.0)
        killed_at = time.monotonic()
        redis.kill()
        wait_health(cp.address, timeout=10, serving=False)  # readiness follows the registry
        with Client(cp.address, ADMIN_TOKEN, timeout=DEADLINE_S) as c:
            for call in (lambda: c.get_adapter("a"), lambda: c.list_adapters_page(),
                         lambda: c.create_adapter("newcomer", str(fault_adapters["c"]), wait=True),
                         lambda: c.pin_adapter("b"), lambda: c.delete_adapter("c")):
                t0 = time.monotonic()
                with pytest.raises(LoraplaneError) as e:
                    call()
                assert (e.value.code, e.value.reason_name) == (grpc.StatusCode.UNAVAILABLE, "REGISTRY_UNAVAILABLE")
                assert time.monotonic() - t0 < DEADLINE_S
        # Cached adapters keep serving while the registry is gone, pinned or not.
        assert generate(dp, "a")[0] == reference["a"]
        time.sleep(1.0)

        redis = EmbeddedRedis(tmp_path / "redis", port=redis.port, appendonly=True).start()
        restarted_at = time.monotonic()
        wait_health(cp.address, timeout=15)  # the same control plane process, not a new one
        traffic.finish()
        assert cp.alive() and dp.alive()

        # Every control-plane call either worked or failed fast with the documented status.
        outcomes = {o for _, _, o in traffic.cp_results}
        assert outcomes <= {"OK", "UNAVAILABLE/REGISTRY_UNAVAILABLE"}, outcomes
        assert max(d for _, d, _ in traffic.cp_results) < DEADLINE_S
        assert any(o != "OK" for t, _, o in traffic.cp_results if killed_at < t < restarted_at)
        assert any(o == "OK" for t, _, o in traffic.cp_results if t > restarted_at)
        # The data plane served its cached adapter through the whole outage.
        assert {o for _, o in traffic.dp_results} == {"OK"}, traffic.dp_results
        assert any(killed_at < t < restarted_at for t, _ in traffic.dp_results)

        # AOF: everything registered before the kill is still there, exactly.
        assert listing(cp) == before
        with Client(cp.address, ADMIN_TOKEN) as c:
            assert c.create_adapter("after-restart", str(fault_adapters["c"]), wait=True).state == 4
            c.pin_adapter("b")
            c.unpin_adapter("a")
            c.delete_adapter("a")
        # The data plane follows the event stream again: the pin and the delete both arrive.
        assert wait_for(lambda: "b" in cached(dp) and cached(dp)["b"].pinned, timeout=20), cached(dp)
        assert wait_for(lambda: "a" not in cached(dp), timeout=20), cached(dp)
        with pytest.raises(LoraplaneError) as e:
            generate(dp, "a")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert generate(dp, "b")[0] == reference["b"]
    finally:
        redis.stop()


@pytest.mark.slow
def test_events_missed_while_disconnected_are_applied_after_reconnect(
        spawn, proxy_factory, fault_model, fault_root, fault_adapters, prefix, redis_url):
    """Redis stays up for everyone else; only the data plane's connection to it is cut."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = proxy_factory(port)
    cp = spawn.control_plane(fault_model, redis_url, prefix, fault_root)
    dp = spawn.data_plane(fault_model, cp.address, f"redis://{proxy.address}/0", prefix, replica="partitioned")
    cp.wait_serving()
    with Client(cp.address, ADMIN_TOKEN) as c:
        versions = {n: c.create_adapter(n, str(fault_adapters[src]), wait=True).version
                    for n, src in (("x", "a"), ("y", "b"), ("z", "a"))}
    dp.wait_serving()
    for name in ("x", "y"):
        generate(dp, name)
    assert set(cached(dp)) == {"x", "y"}
    assert wait_for(lambda: "reconciled with the registry" in dp.log(), timeout=10)

    proxy.cut()
    assert wait_for(lambda: "registry unreachable" in dp.log(), timeout=15), dp.log()[-2000:]
    with Client(cp.address, ADMIN_TOKEN) as c:
        c.delete_adapter("x")  # cached there: must be retired
        c.pin_adapter("y")  # cached there: must become pinned
        c.delete_adapter("z")  # replaced by other content under the same name
        replaced = c.create_adapter("z", str(fault_adapters["c"]), wait=True).version
        c.create_adapter("w", str(fault_adapters["b"]), wait=True, pinned=True)  # new and pinned
    assert replaced != versions["z"]
    time.sleep(1.5)  # a few failed reconnects, so the gap is real
    proxy.restore()

    def applied():
        entries = cached(dp)
        return ("x" not in entries and entries.get("y") and entries["y"].pinned
                and entries.get("w") and entries["w"].pinned)

    assert wait_for(applied, timeout=20), cached(dp)
    with pytest.raises(LoraplaneError) as e:
        generate(dp, "x")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    _, last = generate(dp, "z")
    assert last.adapter_version == replaced
    # ...and it keeps following the stream after the gap.
    with Client(cp.address, ADMIN_TOKEN) as c:
        c.unpin_adapter("y")
    assert wait_for(lambda: not cached(dp)["y"].pinned, timeout=20)
    assert dp.alive()
