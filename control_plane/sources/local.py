"""Local directory sources: copied, so later edits to the source cannot change what was validated."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from control_plane.sources.adapter_files import (
    ADAPTER_FILES,
    FetchedAdapter,
    check_listing,
    copy_capped,
    size_limit,
    too_large,
    unreachable,
)
from control_plane.sources.allowed import check_source_allowed, inside_allowed_roots, not_allowed
from control_plane.sources.config import SourceConfig
from control_plane.sources.spec import SourceSpec
from loraplane.adapter_format import PICKLE_FILES
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

logger = logging.getLogger(__name__)


def fetch_local(spec: SourceSpec, config: SourceConfig, dest: Path) -> FetchedAdapter:
    # Checked again here, not only at request time: the tree may have changed since.
    check_source_allowed(spec, config)
    source = spec.uri()
    src = os.path.realpath(spec.location)
    try:
        names = set(os.listdir(src))
    except FileNotFoundError as e:
        raise unreachable(source, f"local source {spec.location} does not exist") from e
    except NotADirectoryError as e:
        raise LoraplaneError(R.ERROR_REASON_INVALID_SOURCE,
                             f"local source {spec.location} is not a directory", {"field": "source"}) from e
    except PermissionError as e:
        raise unreachable(source, f"local source {spec.location} cannot be read: {e.strerror}") from e
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink loop never resolves to a place inside the roots
            raise not_allowed(f"local source {spec.location}", config) from e
        raise unreachable(source, f"local source {spec.location} cannot be read: {e.strerror}") from e
    sizes = {}
    for name in names.intersection(ADAPTER_FILES + PICKLE_FILES):
        path = os.path.join(src, name)
        # A file may be a symlink of its own; it must stay inside the roots like the directory.
        if not inside_allowed_roots(path, config):
            raise not_allowed(f"{name} in local source {spec.location}", config)
        try:
            sizes[name] = os.stat(path).st_size
        except FileNotFoundError:
            continue  # a dangling symlink is a missing file
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink loop never resolves to a place inside the roots
                raise not_allowed(f"{name} in local source {spec.location}", config) from e
            raise unreachable(source, f"cannot read {name} in local source {spec.location}: {e.strerror}") from e
    check_listing(sizes, config.max_bytes, source)
    for name in ADAPTER_FILES:
        _copy_file(os.path.join(src, name), dest / name, name, config, source)
    logger.info("copied local adapter %s into %s", spec.location, dest)
    return FetchedAdapter(path=dest, resolved_revision="")


def _copy_file(path: str, out: Path, name: str, config: SourceConfig, source: str) -> None:
    # Open the resolved path without following a final symlink: a swap after the roots check
    # fails here instead of reading whatever the new link points to.
    real = os.path.realpath(path)
    if not inside_allowed_roots(real, config):
        raise not_allowed(f"{name} in local source {source}", config)
    try:
        # O_NONBLOCK: opening a FIFO planted as a weights file would otherwise block this worker
        # (and its ingest slot) until some writer shows up; it is refused as not a regular file below.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise not_allowed(f"{name} in local source {source}", config) from e
        raise unreachable(source, f"cannot open {name} in local source: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise LoraplaneError(R.ERROR_REASON_INVALID_ADAPTER_CONFIG,
                                 f"{name} in {source} is not a regular file", {"source": source})
        limit = size_limit(name, config.max_bytes)
        if st.st_size > limit:
            raise too_large(source, name, st.st_size, limit)
        copy_capped(f.read, out, name, config.max_bytes, source)
