"""Adapter names and name@version references, checked the same way by every service."""

from __future__ import annotations

import re

from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

MAX_NAME_LEN = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_VERSION = re.compile(r"sha256:[0-9a-f]{64}")


def validate_name(name: str, field: str = "name") -> str:
    """Names become Redis keys, file names and metric labels: keep them to a safe alphabet."""
    if not name:
        raise LoraplaneError(R.ERROR_REASON_INVALID_NAME, "adapter name is empty", {"field": field})
    if len(name) > MAX_NAME_LEN:
        raise LoraplaneError(R.ERROR_REASON_INVALID_NAME,
                             f"adapter name is {len(name)} characters; the limit is {MAX_NAME_LEN}", {"field": field})
    if not _NAME.fullmatch(name) or ".." in name:
        raise LoraplaneError(
            R.ERROR_REASON_INVALID_NAME,
            f"adapter name {name[:MAX_NAME_LEN]!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' and '-' (no '/', no '..')", {"field": field})
    return name


def parse_reference(ref: str, field: str = "name") -> tuple[str, str]:
    """"name" or "name@sha256:<hex>" -> (name, version or "")."""
    name, sep, version = ref.partition("@")
    validate_name(name, field)
    if sep and not _VERSION.fullmatch(version):
        raise LoraplaneError(R.ERROR_REASON_INVALID_ARGUMENT,
                             f"version {version[:80]!r} must be sha256:<64 lowercase hex>", {"field": field})
    return name, version
