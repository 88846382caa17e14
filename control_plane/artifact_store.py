"""Content-addressed artifact store: `<root>/<sha256 hex>/adapter.safetensors`, written atomically.

An artifact directory appears only once its bytes are complete and verified (write to a temp dir,
fsync, hash, rename), so no reader ever sees half an artifact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from loraplane.adapter_format import digest as content_digest
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)

ARTIFACT_FILE = "adapter.safetensors"
CHUNK_SIZE = 1 << 20
_PREFIX = "sha256:"


def _hex(version: str) -> str:
    if not version.startswith(_PREFIX) or len(version) != len(_PREFIX) + 64:
        raise LoraplaneError(R.ERROR_REASON_INVALID_ARGUMENT, f"version {version[:80]!r} is not sha256:<64 hex>",
                             {"field": "version"})
    hexpart = version[len(_PREFIX):]
    if any(c not in "0123456789abcdef" for c in hexpart):
        raise LoraplaneError(R.ERROR_REASON_INVALID_ARGUMENT, "version is not lowercase hex", {"field": "version"})
    return hexpart


# Scratch space of downloads and writes. An entry untouched this long belongs to a process that
# died mid-ingest (a live one writes, or finishes, well within it); the store may be shared, so a
# younger one may be another replica's work in progress.
STALE_SCRATCH_S = 6 * 3600


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def remove_stale_scratch(self, older_than_s: float = STALE_SCRATCH_S) -> int:
        """Delete scratch entries left by processes killed mid-ingest; returns how many."""
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in self.tmp.iterdir():
            try:
                paths = [entry, *entry.rglob("*")] if entry.is_dir() else [entry]
                if max(p.lstat().st_mtime for p in paths) >= cutoff:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except FileNotFoundError:
                continue  # finished (renamed or cleaned) by its owner meanwhile
            removed += 1
            logger.info("removed stale scratch %s", entry)
        return removed

    def path(self, version: str) -> Path:
        return self.root / _hex(version) / ARTIFACT_FILE

    def exists(self, version: str) -> bool:
        return self.path(version).is_file()

    def put(self, data: bytes) -> str:
        """Store `data`; returns its version. Idempotent: the same bytes give the same version."""
        version = content_digest(data)
        final = self.root / _hex(version)
        if (final / ARTIFACT_FILE).is_file():
            return version
        staging = Path(tempfile.mkdtemp(dir=self.tmp))
        try:
            with open(staging / ARTIFACT_FILE, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if self.hash_file(staging / ARTIFACT_FILE) != version:
                raise LoraplaneError(R.ERROR_REASON_DIGEST_MISMATCH, "artifact bytes changed while being written")
            try:
                os.rename(staging, final)
            except OSError:
                # Another writer won the race with the same content; theirs is just as good.
                if not (final / ARTIFACT_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return version

    @staticmethod
    def hash_file(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_SIZE * 4):
                h.update(chunk)
        return _PREFIX + h.hexdigest()

    def size(self, version: str) -> int:
        return self.path(version).stat().st_size

    def read_chunks(self, version: str, offset: int = 0, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, bytes]]:
        with open(self.path(version), "rb") as f:
            f.seek(offset)
            while chunk := f.read(chunk_size):
                yield offset, chunk
                offset += len(chunk)

    def delete(self, version: str) -> None:
        target = self.root / _hex(version)
        if target.exists():
            # Rename first so a concurrent reader never sees a half-deleted directory as an artifact.
            doomed = Path(tempfile.mkdtemp(dir=self.tmp))
            os.rename(target, doomed / "gone")
            shutil.rmtree(doomed, ignore_errors=True)
            logger.info("deleted artifact %s", version)

    def move_aside(self, version: str) -> Path | None:
        """First half of a delete that can be undone: the artifact leaves its place; None if absent."""
        target = self.root / _hex(version)
        aside = Path(tempfile.mkdtemp(dir=self.tmp))
        try:
            os.rename(target, aside / "gone")
        except FileNotFoundError:
            shutil.rmtree(aside, ignore_errors=True)
            return None
        return aside

    def move_back(self, version: str, aside: Path) -> None:
        try:
            os.rename(aside / "gone", self.root / _hex(version))
        except OSError:
            pass  # a writer of the same bytes put it back already; theirs is just as good
        shutil.rmtree(aside, ignore_errors=True)

    def drop_aside(self, version: str, aside: Path) -> None:
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("deleted artifact %s", version)

    def versions(self) -> list[str]:
        return sorted(_PREFIX + p.name for p in self.root.iterdir() if len(p.name) == 64 and p.is_dir())
