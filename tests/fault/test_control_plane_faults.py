"""A control plane killed in the middle of streaming an artifact to a data plane.

A proxy between the two holds the FetchAdapter stream once a set number of bytes has gone
through, so the SIGKILL lands mid-transfer every time; the rest of that stream is never delivered.
"""

from __future__ import annotations

import hashlib
import threading

import grpc
import pytest

from loraplane.client import Client
from loraplane.errors import LoraplaneError
from tests.fault.conftest import ADMIN_TOKEN, greedy_oracle, wait_for
from tests.servers import RunningDataPlane

PROMPT = [5, 17, 42, 99, 7]
MiB = 1 << 20


@pytest.fixture
def in_process_dp(fault_model, redis_url, prefix, tmp_path):
    from data_plane.server.config import DataPlaneConfig

    started = []

    def start(control_plane: str) -> RunningDataPlane:
        dp = RunningDataPlane(DataPlaneConfig(
            model=str(fault_model), control_plane=control_plane, listen="127.0.0.1:0", redis_url=redis_url,
            redis_prefix=prefix, max_loras=2, max_cpu_loras=2, max_lora_rank=64, max_model_len=256,
            max_num_seqs=4, device="cpu", disk_cache_dir=tmp_path / "dp-disk", grace_period_s=2.0,
            fetch_timeout_s=10.0, fetch_retries=1, replica_id="fetcher"))
        started.append(dp)
        return dp

    yield start
    for dp in started:
        dp.stop()


@pytest.fixture(scope="module")
def big_oracle(fault_model, fault_adapters):
    return greedy_oracle(fault_model, fault_adapters["big"], PROMPT, 8)


def disk_files(dp) -> list:
    return sorted(p.name for p in dp.config.disk_cache_dir.iterdir())


def generate_in_thread(dp, results: list):
    def run():
        try:
            with Client(dp.address, timeout=60) as c:
                results.append(c.generate_text(PROMPT, "big", max_tokens=8, ignore_eos=True))
        except LoraplaneError as e:
            results.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def register_big(cp, fault_adapters):
    cp.wait_serving()
    with Client(cp.address, ADMIN_TOKEN) as c:
        adapter = c.create_adapter("big", str(fault_adapters["big"]), wait=True)
    assert adapter.size_bytes > 3 * MiB  # several FetchAdapter chunks
    return adapter


def tokens_of(dp, version: str) -> list[int]:
    with Client(dp.address) as c:
        ids, last = [], None
        for last in c.generate(PROMPT, "big", max_tokens=8, ignore_eos=True):
            ids.extend(last.token_ids)
    assert last.adapter_version == version
    return ids


@pytest.mark.slow
def test_control_plane_killed_mid_fetch_leaves_no_partial_artifact(
        spawn, proxy_factory, in_process_dp, fault_model, fault_root, fault_adapters, redis_url, prefix, tmp_path,
        big_oracle):
    cp = spawn.control_plane(fault_model, redis_url, prefix, fault_root, data_dir=tmp_path / "cp")
    adapter = register_big(cp, fault_adapters)
    proxy = proxy_factory(cp.port)
    dp = in_process_dp(proxy.address)
    proxy.hold_at = 2 * MiB + MiB // 2
    results: list = []
    thread = generate_in_thread(dp, results)
    assert proxy.held.wait(30), "the fetch never got going"
    cp.kill()
    proxy.release_dropping()
    thread.join(60)
    [error] = results
    assert isinstance(error, LoraplaneError), error
    assert (error.code, error.reason_name) == (grpc.StatusCode.UNAVAILABLE, "CONTROL_PLANE_UNAVAILABLE"), error
    # Half an artifact is never kept: not on disk (no file, no temp file), not in memory.
    assert disk_files(dp) == []
    with Client(dp.address) as c:
        assert [a.name for a in c.list_cached_adapters().adapters] == []
    assert dp.plane.fetcher.fetches == 0

    restarted = spawn.control_plane(fault_model, redis_url, prefix, fault_root, port=cp.port, data_dir=tmp_path / "cp")
    restarted.wait_serving()
    # The same data plane, unrestarted, fetches the whole artifact once the control plane is back.
    assert wait_for(lambda: _served(dp, adapter.version), timeout=30)
    assert tokens_of(dp, adapter.version) == big_oracle
    [stored] = disk_files(dp)
    data = (dp.config.disk_cache_dir / stored).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == adapter.version and len(data) == adapter.size_bytes


def _served(dp, version: str) -> bool:
    try:
        with Client(dp.address) as c:
            _, last = c.generate_text(PROMPT, "big", max_tokens=1)
        return last.adapter_version == version
    except LoraplaneError as e:
        assert e.code == grpc.StatusCode.UNAVAILABLE, e
        return False


@pytest.mark.slow
def test_broken_fetch_stream_resumes_from_the_last_byte(
        spawn, proxy_factory, in_process_dp, fault_model, fault_root, fault_adapters, redis_url, prefix, big_oracle):
    cp = spawn.control_plane(fault_model, redis_url, prefix, fault_root)
    adapter = register_big(cp, fault_adapters)
    proxy = proxy_factory(cp.port)
    dp = in_process_dp(proxy.address)
    hold_at = proxy.hold_at = 2 * MiB + MiB // 2
    results: list = []
    thread = generate_in_thread(dp, results)
    assert proxy.held.wait(30)
    proxy.release_dropping()  # the connection breaks; the control plane itself is fine
    thread.join(60)
    [(text, last)] = results
    assert last.adapter_version == adapter.version
    # Starting over would cost size + hold_at bytes at least (the first connection already carried hold_at).
    # Resuming saves every whole chunk the client had read before the reset; how many of the bytes in flight
    # it had read depends on timing, so the bound is the start-over cost, not an exact figure.
    assert proxy.downstream_bytes < adapter.size_bytes + hold_at, (proxy.downstream_bytes, adapter.size_bytes)
    assert proxy.connections == 2 and dp.plane.fetcher.fetches == 1
    assert tokens_of(dp, adapter.version) == big_oracle
