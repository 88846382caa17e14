"""AdapterCacheService through the real service: answers read where they are current, full tiers
and draining replicas refused with their documented errors."""

from __future__ import annotations

import threading

import grpc
import pytest

from loraplane.errors import LoraplaneError
from loraplane.v1 import cache_service_pb2 as cache_pb2
from tests.factories import make_peft_adapter
from tests.integration.dp_helpers import engine_held, hold_engine, wait_for

GPU, CPU = cache_pb2.CACHE_TIER_GPU, cache_pb2.CACHE_TIER_CPU


@pytest.fixture(scope="module")
def adapter_dirs(base_model, adapter_root):
    made = {}
    for i in range(3):
        path = adapter_root / f"dpc-{i}"
        if not path.exists():
            make_peft_adapter(base_model, path, r=4, alpha=8, seed=20 + i, target_modules=("q_proj", "v_proj"))
        made[f"a{i}"] = path
    return made


@pytest.fixture
def cp(cp_factory, adapter_dirs):
    cp = cp_factory()
    with cp.client() as c:
        for name, path in adapter_dirs.items():
            c.create_adapter(name, str(path), wait=True)
    return cp


def test_a_gpu_prefetch_answers_with_the_slot_it_took(cp, dp_factory):
    dp = dp_factory(cp.address)
    loop = dp.plane.engine_loop
    answer = []
    with engine_held(loop):
        caller = threading.Thread(target=lambda: answer.append(dp.client().prefetch_adapter("a0", GPU)))
        caller.start()
        assert wait_for(lambda: loop._commands.qsize() == 1)  # its promotion, fetched and queued
        # Held again right after the promotion, before the loop publishes its stats: the answer
        # used to come from that snapshot, which did not have the adapter on the GPU yet.
        _, release = hold_engine(loop)
    caller.join(60)
    release.set()
    [entry] = answer
    assert GPU in entry.tiers and CPU in entry.tiers
    assert entry.slot == loop.slots.slot_of(f"a0@{entry.version}") and entry.slot >= 0


def test_a_prefetch_that_cannot_stay_in_a_full_tier_is_refused(cp, dp_factory):
    dp = dp_factory(cp.address, max_cpu_loras=2, disk_cache_bytes=0)
    with cp.client() as c:
        c.pin_adapter("a0")
        c.pin_adapter("a1")
    assert wait_for(lambda: dp.plane.cache.pinned == {"a0", "a1"} and len(dp.plane.cache.cpu.keys()) == 2)
    with dp.client() as c:
        with pytest.raises(LoraplaneError) as e:
            c.prefetch_adapter("a2", CPU)  # loaded, then evicted at once: both entries are pinned
        assert (e.value.code, e.value.reason_name) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED")
        assert e.value.metadata == {"name": "a2"}
        assert {a.name for a in c.list_cached_adapters().adapters} == {"a0", "a1"}


def test_a_draining_replica_refuses_prefetch_and_still_lists(cp, dp_factory):
    dp = dp_factory(cp.address)
    with dp.client() as c:
        c.prefetch_adapter("a0", CPU)
        stream = c.generate([1, 2, 3], max_tokens=20, ignore_eos=True)
        next(stream)
        with engine_held(dp.plane.engine_loop):  # the stream stays in flight, so the server listens on
            stopper = threading.Thread(target=dp.stop)
            stopper.start()
            assert wait_for(lambda: dp.plane.generation.draining)
            with pytest.raises(LoraplaneError) as e:
                c.prefetch_adapter("a1", CPU)
            assert (e.value.code, e.value.reason_name) == (grpc.StatusCode.UNAVAILABLE, "SERVER_NOT_READY")
            assert [a.name for a in c.list_cached_adapters().adapters] == ["a0"]
            assert "a1" not in dp.plane.cache.versions and dp.plane.fetcher.fetches == 1  # nothing fetched
        list(stream)
        stopper.join(60)


def test_evict_waits_for_requests_in_flight_and_refuses_a_pinned_adapter(cp, dp_factory):
    dp = dp_factory(cp.address)
    cache = dp.plane.cache
    lease = dp.thread.call(cache.acquire("a1"))  # a request holding a1 in the CPU tier

    async def release():
        cache.release(lease)

    with dp.client() as c:
        c.evict_adapter("a1", CPU)
        assert lease.key in cache.cpu, "in use: it stays until its request ends"
        dp.thread.call(release())
        assert lease.key not in cache.cpu, "and goes when it does (it used to stay for good)"
        with cp.client() as admin:
            admin.pin_adapter("a0")
        assert wait_for(lambda: cache.pinned == {"a0"})
        with pytest.raises(LoraplaneError) as e:
            c.evict_adapter("a0")
        assert (e.value.code, e.value.reason_name) == (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_PINNED")
        assert "a0" in {a.name for a in c.list_cached_adapters().adapters}


def test_a_disk_prefetch_stops_after_the_download(cp, dp_factory):
    """tier=DISK puts the artifact on disk and nothing in the CPU tier, as the proto says."""
    DISK = cache_pb2.CACHE_TIER_DISK
    dp = dp_factory(cp.address)
    with dp.client() as c:
        entry = c.prefetch_adapter("a2", DISK)
        assert list(entry.tiers) == [DISK] and entry.slot == -1
        assert f"a2@{entry.version}" not in dp.plane.cache.cpu and entry.version in dp.plane.cache.disk
        assert list(c.prefetch_adapter("a2", DISK).tiers) == [DISK]  # again: already there, no fetch
    assert dp.plane.fetcher.fetches == 1
    off = dp_factory(cp.address, disk_cache_bytes=0)
    with off.client() as c:
        with pytest.raises(LoraplaneError) as e:
            c.prefetch_adapter("a2", DISK)
        assert (e.value.code, e.value.reason_name) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CAPACITY_EXHAUSTED")
