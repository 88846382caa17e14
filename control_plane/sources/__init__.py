"""Where adapters come from: local directories, the Hugging Face Hub, S3.

The registry calls `parse_source` and `check_source_allowed` while handling a request (cheap,
no network), then `fetch_source` in a worker thread. Every refusal is a LoraplaneError.
"""

from __future__ import annotations

from pathlib import Path

from control_plane.sources.adapter_files import ADAPTER_FILES, FetchedAdapter
from control_plane.sources.allowed import check_source_allowed
from control_plane.sources.config import SourceConfig
from control_plane.sources.spec import MAX_URI_CHARS, SourceSpec, parse_source

__all__ = [
    "ADAPTER_FILES",
    "MAX_URI_CHARS",
    "FetchedAdapter",
    "SourceConfig",
    "SourceSpec",
    "check_source_allowed",
    "fetch_source",
    "parse_source",
]


def fetch_source(spec: SourceSpec, config: SourceConfig, dest: Path) -> FetchedAdapter:
    """BLOCKING: put adapter_config.json and adapter_model.safetensors from `spec` into `dest`.

    `dest` is an existing empty directory that the caller owns and deletes afterwards, also on failure.
    """
    dest = Path(dest)
    if not dest.is_dir() or any(dest.iterdir()):
        raise ValueError(f"dest {dest} must be an existing, empty directory")
    # Imported on use: s3fs is an optional dependency, and huggingface_hub is slow to import.
    if spec.scheme == "file":
        from control_plane.sources.local import fetch_local
        return fetch_local(spec, config, dest)
    if spec.scheme == "hf":
        from control_plane.sources.hf import fetch_hf
        return fetch_hf(spec, config, dest)
    if spec.scheme == "s3":
        from control_plane.sources.s3 import fetch_s3
        return fetch_s3(spec, config, dest)
    raise ValueError(f"unknown source scheme {spec.scheme!r}; build specs with parse_source")
