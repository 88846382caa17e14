"""The replica's heartbeat in Redis: a hash with a TTL that routers read for adapter affinity."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from redis import exceptions as redis_errors

from control_plane.registry import Registry
from data_plane.lora.adapter_cache import AdapterCache
from data_plane.server.engine_loop import EngineLoop

logger = logging.getLogger(__name__)


def _names(keys) -> list[str]:
    return sorted({k.split("@", 1)[0] for k in keys})


async def heartbeat(registry: Registry, replica_id: str, address: str, model: str, loop: EngineLoop,
                    cache: AdapterCache, interval_s: float) -> None:
    key = registry.replica_key(replica_id)
    ttl_ms = int(interval_s * 3 * 1000)  # three missed beats and the replica is gone
    while True:
        stats = loop.stats
        fields = {
            "replica_id": replica_id, "address": address, "model": model, "updated_ms": int(time.time() * 1000),
            "gpu": json.dumps(_names(stats.gpu_adapters)), "cpu": json.dumps(_names(cache.cpu.keys())),
            "disk": json.dumps(sorted(n for n, v in cache.versions.items() if v in cache.disk)),
            "queue_depth": stats.waiting, "running": stats.running, "free_slots": stats.free_slots,
        }
        try:
            async with registry.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=fields)
                pipe.pexpire(key, ttl_ms)
                await pipe.execute()
        except redis_errors.RedisError as e:  # keep beating: Redis may come back
            logger.warning("heartbeat failed: %s", e)
        await asyncio.sleep(interval_s)
