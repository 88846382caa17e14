"""Adapter handling through the real service: real control plane, Redis, gRPC and tiny model."""

from __future__ import annotations

import threading

import grpc
import pytest

from loraplane.errors import LoraplaneError
from loraplane.v1 import cache_service_pb2 as cache_pb2
from loraplane.v1 import generation_service_pb2 as gen_pb2
from tests.factories import make_peft_adapter
from tests.integration.dp_helpers import engine_held, wait_for

TARGETS = ("q_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def adapter_dirs(base_model, adapter_root):
    made = {}
    for name, r, seed in (("rank4", 4, 1), ("rank4-other", 4, 2), ("rank32", 32, 3)):
        path = adapter_root / f"dpa-{name}"
        if not path.exists():
            make_peft_adapter(base_model, path, r=r, alpha=2 * r, seed=seed, target_modules=TARGETS)
        made[name] = path
    return made


def generate(dp, adapter, max_tokens=2):
    with dp.client(timeout=30) as c:
        return list(c.generate([1, 2, 3], adapter, max_tokens=max_tokens, ignore_eos=True))


def serving_x(cp_factory, dp_factory, adapter_dir, **dp_settings):
    """A control plane with adapter "x" READY from `adapter_dir`, and a data plane on it: (cp, dp, version)."""
    cp = cp_factory()
    with cp.client() as c:
        version = c.create_adapter("x", str(adapter_dir), wait=True).version
    return cp, dp_factory(cp.address, **dp_settings), version


def test_an_adapter_above_max_lora_rank_fails_fast_and_blocks_no_one(cp_factory, dp_factory, adapter_dirs):
    cp = cp_factory()
    with cp.client() as c:
        c.create_adapter("big", str(adapter_dirs["rank32"]), wait=True)
        c.create_adapter("small", str(adapter_dirs["rank4"]), wait=True)
    dp = dp_factory(cp.address, max_lora_rank=16)
    for _ in range(2):  # the second time from the disk tier
        with pytest.raises(LoraplaneError) as e:
            generate(dp, "big")  # before the fix: queued for a slot it never got, until the deadline
        assert (e.value.code, e.value.reason_name) == (grpc.StatusCode.INVALID_ARGUMENT, "RANK_TOO_LARGE")
        assert e.value.metadata == {"rank": "32", "max_rank": "16"}
    with dp.client() as c, pytest.raises(LoraplaneError) as e:
        c.prefetch_adapter("big", cache_pb2.CACHE_TIER_GPU)
    assert e.value.reason_name == "RANK_TOO_LARGE"
    assert generate(dp, "small")[-1].finish_reason == gen_pb2.FINISH_REASON_LENGTH
    loop = dp.plane.engine_loop
    assert loop.stats.waiting == 0 and [k.split("@")[0] for k in loop.slots.keys()] == ["small"]


def test_a_request_for_a_replaced_version_never_makes_plain_requests_stale(cp_factory, dp_factory, adapter_dirs):
    cp, dp, v1 = serving_x(cp_factory, dp_factory, adapter_dirs["rank4"])
    cache, loop = dp.plane.cache, dp.plane.engine_loop
    versions = {}

    def run(label, ref):
        versions[label] = generate(dp, ref)[-1].adapter_version

    threads = []

    def start(label, ref, queued):
        """Start a call and wait until it holds its adapter and its add waits for the engine."""
        threads.append(threading.Thread(target=run, args=(label, ref)))
        threads[-1].start()
        assert wait_for(lambda: loop._commands.qsize() == queued)

    with engine_held(loop):
        start("plain, before", "x", 1)  # it holds v1 in the CPU tier
        with cp.client() as c:
            c.delete_adapter("x")
            v2 = c.create_adapter("x", str(adapter_dirs["rank4-other"]), wait=True).version
        assert wait_for(lambda: "x" not in cache.versions)  # the watcher retired v1
        assert wait_for(lambda: loop._commands.qsize() == 2)  # and asked the engine to evict it
        start("explicit v1", f"x@{v1}", 3)  # a CPU hit: v1 is still held
        start("plain, after", "x", 4)
    for t in threads:
        t.join(60)
    # Before the fix, the explicit ref made v1 what "x" means here, while it was still cached.
    assert versions == {"plain, before": v1, "explicit v1": v1, "plain, after": v2}
    assert generate(dp, "x")[-1].adapter_version == v2
    assert v1 not in cache.disk  # retired from every tier, the disk too
    with pytest.raises(LoraplaneError) as e:
        generate(dp, f"x@{v1}")  # deleted from the registry, and no tier here serves it any more
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert not cache._retired  # v1 left once its last request ended: nothing is kept about it


def test_a_version_retired_while_its_bytes_load_never_becomes_current(cp_factory, dp_factory, adapter_dirs,
                                                                       monkeypatch):
    cp, dp, v1 = serving_x(cp_factory, dp_factory, adapter_dirs["rank4"])
    cache, watcher = dp.plane.cache, dp.plane.watcher
    check, entered, gate = cache.check, threading.Event(), threading.Event()

    def held_check(adapter):  # the real check (in a worker thread), once the registry has moved on
        entered.set()
        gate.wait(30)
        check(adapter)

    monkeypatch.setattr(cache, "check", held_check)
    served = {}
    first = threading.Thread(target=lambda: served.update(first=generate(dp, "x")[-1].adapter_version))
    first.start()
    assert entered.wait(30)  # resolved to v1 and fetched; it is being parsed
    applied = watcher.applied
    with cp.client() as c:
        c.delete_adapter("x")
        assert wait_for(lambda: watcher.applied > applied)  # the DELETED event retired "x" mid-load
        v2 = c.create_adapter("x", str(adapter_dirs["rank4-other"]), wait=True).version
    gate.set()
    first.join(60)
    assert served == {"first": v1}  # the request runs on what it resolved
    # Before the fix the finished load made v1 what "x" means here, and it stayed a CPU hit.
    assert generate(dp, "x")[-1].adapter_version == v2
    assert cache.versions["x"] == v2
    # And v1 leaves the tiers as a version retired the ordinary way does: nothing here serves it.
    assert f"x@{v1}" not in cache.cached_keys() and v1 not in cache.disk and not cache._retired
    with pytest.raises(LoraplaneError) as e:
        generate(dp, f"x@{v1}")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert not cache._in_flight and not cache._retirements  # nothing kept about names no longer loading


def test_a_disk_tier_that_cannot_be_written_still_serves_from_memory(cp_factory, dp_factory, adapter_dirs,
                                                                      tmp_path):
    disk = tmp_path / "lost-volume"
    _, dp, _ = serving_x(cp_factory, dp_factory, adapter_dirs["rank4"], disk_cache_dir=disk)
    disk.rmdir()
    disk.write_bytes(b"")  # the tier's directory is gone: every write into it fails (ENOTDIR)
    for _ in range(2):  # fetched and served from memory, then a CPU hit
        assert generate(dp, "x")[-1].finish_reason == gen_pb2.FINISH_REASON_LENGTH
    assert dp.plane.cache.disk.versions() == []
    metrics = dp.plane.metrics.registry
    assert metrics.get_sample_value("loraplane_adapter_cache_lookups_total", {"tier": "cpu", "result": "hit"}) == 1


def test_a_name_registered_again_with_the_same_weights_stays_cached(cp_factory, dp_factory, adapter_dirs):
    cp, dp, version = serving_x(cp_factory, dp_factory, adapter_dirs["rank4"])
    cache, loop = dp.plane.cache, dp.plane.engine_loop
    key = f"x@{version}"
    threads = []

    def start(queued):
        """Start a plain-name call and wait until it holds its adapter and waits for the engine."""
        threads.append(threading.Thread(target=generate, args=(dp, "x")))
        threads[-1].start()
        assert wait_for(lambda: loop._commands.qsize() == queued)

    with engine_held(loop):
        start(1)
        with cp.client() as c:
            c.delete_adapter("x")
            assert wait_for(lambda: "x" not in cache.versions)  # retired while a request holds it
            assert c.create_adapter("x", str(adapter_dirs["rank4"]),
                                    wait=True).version == version
        assert wait_for(lambda: loop._commands.qsize() == 2)
        start(3)  # resolves the name again: the same version, current once more
    for t in threads:
        t.join(60)
    assert key in cache.cpu and not cache._retired  # it used to be dropped after every request
    metrics = dp.plane.metrics.registry

    def cpu_hits():
        return metrics.get_sample_value("loraplane_adapter_cache_lookups_total", {"tier": "cpu", "result": "hit"})

    hits = cpu_hits()
    for _ in range(2):
        generate(dp, "x")
    assert cpu_hits() == hits + 2 and key in cache.cpu
