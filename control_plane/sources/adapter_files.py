"""The files a source must deliver, the checks made on a remote listing, and capped copies.

Every source lists first and downloads second, so the refusals that need no bytes (pickle-only
adapter, no config, too large) happen before anything large crosses the network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from loraplane.adapter_format import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE
from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# A PEFT adapter_config.json is a few KB; anything near this is not one, whatever max_bytes says.
CONFIG_MAX_BYTES = 1 << 20
COPY_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class FetchedAdapter:
    path: Path  # directory holding adapter_config.json + adapter_model.safetensors
    resolved_revision: str  # hf: the commit sha; s3: the weights' VersionId or ETag; local: ""


def unreachable(source: str, message: str) -> LoraplaneError:
    return LoraplaneError(R.ERROR_REASON_SOURCE_UNREACHABLE, message, {"source": source})


def size_limit(name: str, max_bytes: int) -> int:
    return CONFIG_MAX_BYTES if name == CONFIG_FILE else max_bytes


def too_large(source: str, name: str, size: int, limit: int, *, streaming: bool = False) -> LoraplaneError:
    """`streaming`: `size` is how far a download got before it was stopped, not the file's size."""
    if name == CONFIG_FILE:
        return LoraplaneError(R.ERROR_REASON_INVALID_ADAPTER_CONFIG,
                              f"{CONFIG_FILE} in {source} is over {limit} bytes; a PEFT config is a few KB",
                              {"source": source})
    size_text = f"ran past {size} bytes" if streaming else f"is {size} bytes"
    return LoraplaneError(R.ERROR_REASON_ADAPTER_TOO_LARGE,
                          f"{name} in {source} {size_text}, over the {limit}-byte limit",
                          {"source": source, "size_bytes": str(size), "max_bytes": str(limit)})


def check_listing(sizes: Mapping[str, int | None], max_bytes: int, source: str) -> None:
    """Refuse from a listing alone: `sizes` maps each file at the adapter's top level to its size."""
    if WEIGHTS_FILE not in sizes:
        pickles = [p for p in PICKLE_FILES if p in sizes]
        if pickles:
            raise LoraplaneError(
                R.ERROR_REASON_UNSAFE_FORMAT,
                f"{source} holds {pickles[0]}, a pickle file, which is never downloaded or loaded; "
                f"publish the adapter as {WEIGHTS_FILE} (PEFT: save_pretrained(..., safe_serialization=True))",
                {"source": source, "file": pickles[0]})
        raise LoraplaneError(R.ERROR_REASON_INVALID_ADAPTER_CONFIG,
                             f"{source} has no {WEIGHTS_FILE}", {"source": source})
    if CONFIG_FILE not in sizes:
        raise LoraplaneError(R.ERROR_REASON_INVALID_ADAPTER_CONFIG,
                             f"{source} has no {CONFIG_FILE}", {"source": source})
    for name in ADAPTER_FILES:
        size, limit = sizes[name], size_limit(name, max_bytes)
        if size is not None and size > limit:
            raise too_large(source, name, size, limit)


def check_written(path: Path, name: str, max_bytes: int, source: str) -> int:
    """The bytes on disk are what gets validated: enforce the limit on them, whatever was announced."""
    size = path.stat().st_size
    limit = size_limit(name, max_bytes)
    if size > limit:
        raise too_large(source, name, size, limit)
    return size


def copy_capped(read: Callable[[int], bytes], out: Path, name: str, max_bytes: int, source: str) -> int:
    """Copy from `read` (returns b"" at the end) into a new file, stopping as soon as it runs past the limit."""
    limit = size_limit(name, max_bytes)
    written = 0
    with open(out, "xb") as f:
        while chunk := read(COPY_CHUNK_BYTES):
            written += len(chunk)
            if written > limit:
                raise too_large(source, name, written, limit, streaming=True)
            f.write(chunk)
    return written
