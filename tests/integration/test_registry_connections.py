"""The registry after Redis dropped its connections (a restart, a failover, `timeout` on idle clients).

Each test has a Redis server of its own, because CLIENT KILL would cut every other test's
connections on the session's shared one.
"""

from __future__ import annotations

import asyncio

import pytest
import redis

from control_plane.registry import Registry
from loraplane.embedded_redis import EmbeddedRedis
from loraplane.errors import LoraplaneError

POOLED = 6  # idle connections left in the pool, all of them stale after the kill


@pytest.fixture
def private_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server.url
    server.stop()


async def _fill_pool(registry: Registry) -> None:
    await asyncio.gather(*(registry.list(10, "") for _ in range(POOLED)))


def _kill_clients(url: str) -> int:
    with redis.Redis.from_url(url) as admin:
        return admin.client_kill_filter(_type="normal", skipme=True)


def test_every_read_survives_stale_pooled_connections(private_redis):
    async def main():
        registry = Registry.from_url(private_redis, "p")
        try:
            await registry.create("a1", False, {"source": "local"})
            reads = {
                "ping": lambda: registry.ping(),
                "get": lambda: registry.get("a1"),
                "list": lambda: registry.list(10, ""),
                "names_in": lambda: registry.names_in("PENDING"),
                "pinned_names": lambda: registry.pinned_names(),
                "artifact_refs": lambda: registry.artifact_refs("v"),
                "last_event_id": lambda: registry.last_event_id(),
            }
            results = {}
            for name, read in reads.items():
                await _fill_pool(registry)
                assert _kill_clients(private_redis) >= POOLED
                results[name] = await read()  # raised REGISTRY_UNAVAILABLE before the retry
            return results
        finally:
            await registry.close()

    results = asyncio.run(main())
    assert results["ping"] is True
    assert results["get"].name == "a1"
    assert [r.name for r in results["list"][0]] == ["a1"]
    assert results["names_in"] == ["a1"]
    assert results["pinned_names"] == [] and results["artifact_refs"] == 0
    assert results["last_event_id"] != "0-0"


def test_a_write_on_a_stale_connection_fails_once_changes_nothing_and_the_next_one_works(private_redis):
    async def main():
        registry = Registry.from_url(private_redis, "p")
        try:
            await registry.create("a1", False, {"source": "local"})
            await _fill_pool(registry)
            assert _kill_clients(private_redis) >= POOLED
            with pytest.raises(LoraplaneError) as e:
                await registry.set_pinned("a1", True)
            assert e.value.reason_name == "REGISTRY_UNAVAILABLE"
            unchanged = await registry.get("a1")
            # Every other pooled connection was stale too, and all were dropped: concurrent writes,
            # which take several connections from the pool at once, all work.
            pinned = await registry.set_pinned("a1", True)
            created = await asyncio.gather(*(registry.create(f"b{i}", False, {"source": "local"})
                                             for i in range(POOLED)))
            return unchanged, pinned, created
        finally:
            await registry.close()

    unchanged, pinned, created = asyncio.run(main())
    assert unchanged.pinned is False
    assert pinned.pinned is True
    assert [r.name for r in created] == [f"b{i}" for i in range(POOLED)]


def test_redis_refusing_writes_is_registry_unavailable_and_changes_nothing(private_redis, cp_factory, good_adapter):
    """OOM under maxmemory with noeviction (the chart's setting) or READONLY after a failover: Redis
    answers, but with an error reply. Callers get UNAVAILABLE/REGISTRY_UNAVAILABLE, not UNKNOWN with
    Redis's raw text, and the control plane's background loops live on."""
    import grpc

    cp = cp_factory(redis_url=private_redis)
    with cp.client() as c:
        c.create_adapter("before", str(good_adapter), wait=True)
    with redis.Redis.from_url(private_redis) as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            with cp.client() as c:
                with pytest.raises(LoraplaneError) as e:
                    c.create_adapter("during", str(good_adapter), wait=True)
                assert e.value.code == grpc.StatusCode.UNAVAILABLE
                assert e.value.reason_name == "REGISTRY_UNAVAILABLE" and "OOM" in str(e.value)
                with pytest.raises(LoraplaneError) as e:
                    c.pin_adapter("before")
                assert e.value.reason_name == "REGISTRY_UNAVAILABLE"
                assert [a.name for a in c.list_adapters()] == ["before"]  # reads still work
                assert not c.get_adapter("before").pinned
        finally:
            admin.config_set("maxmemory", 0)
    with cp.client() as c:
        assert c.create_adapter("after", str(good_adapter), wait=True).name == "after"
    assert not [t.get_name() for t in cp.plane._background if t.done()]


def test_a_renewal_only_extends_its_own_lease(private_redis):
    """A job whose lease lapsed (its record deleted and registered again, say) keeps renewing; that
    renewal must not take the lapsed lease of the newer job on the same name."""
    async def main():
        registry = Registry.from_url(private_redis, "p")
        try:
            await registry.create("n", False, {"source": "local", "lease_owner": "new-job", "lease_until": 0})
            took_by_renewal = await registry.claim("n", "old-job", 30_000, renew=True)
            record = await registry.get("n")
            renewed_own = await registry.claim("n", "new-job", 30_000, renew=True)
            taken_over = await registry.claim("other", "x", 30_000, renew=True)  # no such record
            return took_by_renewal, record.lease_owner, renewed_own, taken_over
        finally:
            await registry.close()

    assert asyncio.run(main()) == (False, "new-job", True, False)
