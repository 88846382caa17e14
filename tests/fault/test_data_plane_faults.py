"""Data-plane processes killed, drained and abandoned by their clients mid-stream."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from loraplane.client import Client
from loraplane.embedded_redis import free_port
from loraplane.errors import LoraplaneError
from loraplane.v1 import generation_service_pb2 as gen_pb2
from tests.fault.conftest import ADMIN_TOKEN, REPO, wait_for, wait_health

PROMPT = [5, 17, 42, 99, 7, 11]
LONG = 400  # tokens: seconds of streaming on the medium model, so a kill lands mid-stream


@pytest.fixture
def control_plane(spawn, fault_model, fault_root, fault_adapters, redis_url, prefix):
    cp = spawn.control_plane(fault_model, redis_url, prefix, fault_root)
    cp.wait_serving()
    with Client(cp.address, ADMIN_TOKEN) as c:
        for name in ("a", "b", "c"):
            c.create_adapter(name, str(fault_adapters[name]), wait=True)
    return cp


def collect(stream):
    ids, last = [], None
    for last in stream:
        ids.extend(last.token_ids)
    return ids, last


@pytest.mark.slow
def test_killed_replica_gives_unavailable_and_the_same_request_id_completes_elsewhere(
        spawn, control_plane, fault_model, redis_url, prefix):
    dp1 = spawn.data_plane(fault_model, control_plane.address, redis_url, prefix, replica="victim")
    dp2 = spawn.data_plane(fault_model, control_plane.address, redis_url, prefix, replica="survivor")
    dp1.wait_serving()
    dp2.wait_serving()
    with Client(dp2.address) as c:
        reference, _ = collect(c.generate(PROMPT, "a", max_tokens=LONG, ignore_eos=True))
    with Client(dp1.address) as c:
        stream = c.generate(PROMPT, "a", max_tokens=LONG, ignore_eos=True, request_id="retry-me")
        first = next(stream)
        assert first.request_id == "retry-me" and not first.finish_reason
        dp1.kill()
        seen = list(first.token_ids)
        with pytest.raises(LoraplaneError) as e:
            for msg in stream:
                seen.extend(msg.token_ids)
                assert not msg.finish_reason, "the stream must not look finished"
        assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
        assert len(seen) < LONG
    # The client retries the very same request on another replica: the id is not tied to the dead one.
    with Client(dp2.address) as c:
        ids, last = collect(c.generate(PROMPT, "a", max_tokens=LONG, ignore_eos=True, request_id="retry-me"))
    assert last.request_id == "retry-me" and last.finish_reason == gen_pb2.FINISH_REASON_LENGTH
    assert ids == reference and seen == reference[:len(seen)]


@pytest.mark.slow
def test_sigterm_drains_inflight_streams_and_exits_zero(spawn, control_plane, fault_model, redis_url, prefix):
    dp = spawn.data_plane(fault_model, control_plane.address, redis_url, prefix, replica="drainer")
    dp.wait_serving()
    results, errors = {}, []

    def stream(i):
        try:
            with Client(dp.address) as c:
                s = c.generate(PROMPT, "ab"[i], max_tokens=LONG, ignore_eos=True)
                first = next(s)
                started.release()
                ids, last = collect(s)
                results[i] = (list(first.token_ids) + ids, last)
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)
            started.release()

    started = threading.Semaphore(0)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=60)
    t0 = time.monotonic()
    dp.terminate()
    wait_health(dp.address, timeout=10, serving=False)  # readiness drops at once, so routers stop sending
    # Still listening while the streams run: a late call is refused by the handler, retryably.
    with Client(dp.address, timeout=5) as c, pytest.raises(LoraplaneError) as e:
        collect(c.generate(PROMPT, max_tokens=2))
    assert (e.value.code, e.value.reason_name) == (grpc.StatusCode.UNAVAILABLE, "SERVER_NOT_READY"), e.value
    assert all(t.is_alive() for t in threads), "the streams ended before the late call: the test proved nothing"
    for t in threads:
        t.join(60)
    assert not errors, errors
    for ids, last in results.values():
        assert last.finish_reason == gen_pb2.FINISH_REASON_LENGTH and len(ids) == LONG
    assert dp.wait(60) == 0
    log = dp.log()
    assert "data plane stopped" in log and "Traceback" not in log, log[-3000:]
    assert time.monotonic() - t0 < 30  # well within the grace period: it exits once drained


CLIENT = """
import sys
from loraplane.client import Client
with Client(sys.argv[1]) as c:
    for msg in c.generate([5, 17, 42], sys.argv[2], max_tokens=400, ignore_eos=True):
        print("got", len(msg.token_ids), flush=True)
"""


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@pytest.mark.slow
def test_clients_gone_mid_stream_free_their_slots_and_kv(spawn, control_plane, fault_model, redis_url, prefix):
    metrics_port = free_port()
    dp = spawn.data_plane(fault_model, control_plane.address, redis_url, prefix, replica="abandoned",
                          extra=("--metrics-port", str(metrics_port)))
    dp.wait_serving()
    # One client process killed outright (its socket is closed by the kernel), one that cancels.
    killed = subprocess.Popen([sys.executable, "-c", CLIENT, dp.address, "a"], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert killed.stdout.readline().startswith("got")
        with Client(dp.address) as c:
            stream = c.generate(PROMPT, "b", max_tokens=LONG, ignore_eos=True)
            next(stream)
            assert wait_for(lambda: scrape(metrics_port)["loraplane_requests_running"] == 2, timeout=10)
            killed.kill()
            stream.close()
    finally:
        killed.kill()
        killed.wait()

    def idle():
        m = scrape(metrics_port)
        return (m["loraplane_requests_running"], m["loraplane_requests_waiting"],
                m["loraplane_kv_cache_usage_ratio"]) == (0, 0, 0)

    assert wait_for(idle, timeout=15), scrape(metrics_port)
    with Client(dp.address) as c:
        cached = c.list_cached_adapters()
        assert {a.name for a in cached.adapters} >= {"a", "b"}
        assert all(a.active_requests == 0 for a in cached.adapters)
        # Both slots hold abandoned adapters; a third one can only run if neither is still held.
        ids, last = collect(c.generate(PROMPT, "c", max_tokens=8, ignore_eos=True))
        assert last.finish_reason == gen_pb2.FINISH_REASON_LENGTH and len(ids) == 8
    assert dp.alive()
