"""Disk tier: artifacts as `<sha256 hex>.safetensors` files, LRU within a byte budget.

Files are written to a temp name (`*.part`, removed if the write fails and at start-up) and renamed,
and their digest is checked on every read, so a torn write or a flipped bit is a miss, never a wrong
adapter.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)
_PREFIX = "sha256:"


class DiskCache:
    def __init__(self, root: Path, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("disk cache bytes must be >= 0 (0 disables the tier)")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # version -> (size, last use); rebuilt from the directory so a restart keeps the tier.
        self._index: dict[str, tuple[int, float]] = {}
        for path in self.root.glob("*.part"):
            # A write cut short before its rename (a crash, a full volume): never a valid entry, and
            # nothing else would ever remove it.
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                logger.warning("could not remove the stale partial file %s: %s", path, e)
        for path in self.root.glob("*.safetensors"):
            st = path.stat()
            self._index[_PREFIX + path.stem] = (st.st_size, st.st_mtime)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def _path(self, version: str) -> Path:
        return self.root / f"{version.removeprefix(_PREFIX)}.safetensors"

    def __contains__(self, version: str) -> bool:
        with self._lock:
            return version in self._index

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(size for size, _ in self._index.values())

    def versions(self) -> list[str]:
        with self._lock:
            return list(self._index)

    def get(self, version: str) -> bytes | None:
        path = self._path(version)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._index.pop(version, None)
            return None
        except OSError as e:
            # A bad sector, a permission changed under us: the tier is a cache, so this is a miss and
            # the adapter comes from the control plane, not a failed request.
            logger.warning("disk cache file for %s cannot be read (%s); treating it as a miss", version, e)
            self.remove(version)
            return None
        if _PREFIX + hashlib.sha256(data).hexdigest() != version:
            logger.warning("disk cache file for %s is corrupted; dropping it", version)
            self.remove(version)
            return None
        with self._lock:
            self._index[version] = (len(data), time.time())
        return data

    def put(self, version: str, data: bytes) -> list[str]:
        """Store the bytes (already verified by the caller); returns versions evicted for room.
        Raises OSError if they cannot be written (a full volume), leaving no partial file."""
        if not self.enabled or len(data) > self.max_bytes:
            return []
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(version))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._index[version] = (len(data), time.time())
            victims = []
            total = sum(size for size, _ in self._index.values())
            for v, (size, _) in sorted(self._index.items(), key=lambda kv: kv[1][1]):
                if total <= self.max_bytes:
                    break
                if v != version:
                    victims.append(v)
                    total -= size
        for v in victims:
            self.remove(v)
        return victims

    def remove(self, version: str) -> None:
        """Forget `version`; a file that cannot be deleted is logged, never raised: the tier is a
        cache, and the entry is gone from the index either way."""
        with self._lock:
            self._index.pop(version, None)
        try:
            self._path(version).unlink(missing_ok=True)
        except OSError as e:
            logger.warning("could not remove disk cache file for %s: %s", version, e)
