"""Which sources this control plane may read: local paths only under the allow-listed roots."""

from __future__ import annotations

import os

from control_plane.sources.config import SourceConfig
from control_plane.sources.spec import SourceSpec
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R


def inside_allowed_roots(path: str, config: SourceConfig) -> bool:
    """True when `path`, with every symlink and '..' resolved, lies in (or is) an allowed root."""
    real = os.path.realpath(path)
    for root in config.allowed_roots:
        root_real = os.path.realpath(root)
        if real == root_real or real.startswith(root_real.rstrip("/") + "/"):
            return True
    return False


def not_allowed(what: str, config: SourceConfig) -> LoraplaneError:
    if not config.allowed_roots:
        why = "no local source roots are configured, so local sources are disabled"
    else:
        roots = ", ".join(str(r) for r in config.allowed_roots)
        why = f"it resolves outside the allowed roots ({roots})"
    return LoraplaneError(R.ERROR_REASON_SOURCE_NOT_ALLOWED, f"{what} is not allowed: {why}",
                          {"field": "source"})


def check_source_allowed(spec: SourceSpec, config: SourceConfig) -> None:
    """Cheap and synchronous (no I/O beyond realpath): refuse sources this deployment must not read."""
    if spec.scheme == "file" and not inside_allowed_roots(spec.location, config):
        raise not_allowed(f"local source {spec.location}", config)
