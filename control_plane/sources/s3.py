"""S3 (and S3-compatible) sources, read with s3fs.

The prefix is listed once; each file is then read with If-Match on the ETag seen when it was
opened, so an object overwritten mid-download fails instead of mixing two versions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import s3fs
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from s3fs.utils import FileExpired

from control_plane.sources.adapter_files import (
    ADAPTER_FILES,
    COPY_CHUNK_BYTES,
    FetchedAdapter,
    check_listing,
    copy_capped,
    size_limit,
    too_large,
    unreachable,
)
from control_plane.sources.config import SourceConfig
from control_plane.sources.spec import SourceSpec
from loraplane.adapter_format import WEIGHTS_FILE
from loraplane.errors import LoraplaneError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# s3fs retries with its own backoff on top of botocore's; a few quick tries are enough for a
# registration that the operator can simply repeat.
_S3FS_RETRIES = 2
# OSError here is always remote: s3fs turns S3 error codes into FileNotFoundError/PermissionError/OSError;
# local writes happen outside the calls wrapped with these.
_S3_ERRORS = (OSError, BotoCoreError, ClientError)


def _filesystem(config: SourceConfig) -> s3fs.S3FileSystem:
    fs = s3fs.S3FileSystem(
        anon=config.s3_anon, key=config.s3_key, secret=config.s3_secret,
        endpoint_url=config.s3_endpoint_url,
        # A private instance and no listing cache: credentials and listings never leak between fetches.
        skip_instance_cache=True, use_listings_cache=False,
        config_kwargs={"connect_timeout": config.timeout_s, "read_timeout": config.timeout_s,
                       "retries": {"total_max_attempts": 2, "mode": "standard"}},
    )
    fs.retries = _S3FS_RETRIES
    return fs


def fetch_s3(spec: SourceSpec, config: SourceConfig, dest: Path) -> FetchedAdapter:
    source = spec.uri()
    fs = _filesystem(config)

    def remote(call: Callable[[], T]) -> T:
        try:
            return call()
        except _S3_ERRORS as e:
            raise _s3_error(e, source, config) from e

    entries = remote(lambda: fs.ls(spec.location, detail=True, refresh=True))
    files = {e["name"].rsplit("/", 1)[-1]: e for e in entries if e.get("type") == "file"}
    check_listing({name: e.get("size") for name, e in files.items()}, config.max_bytes, source)

    details = {}
    for name in ADAPTER_FILES:
        path = files[name]["name"]
        # cache_type "none": every read is one ranged GET carrying If-Match, nothing is read ahead.
        with remote(lambda p=path: fs.open(p, "rb", block_size=COPY_CHUNK_BYTES, cache_type="none")) as f:
            limit = size_limit(name, config.max_bytes)
            if f.size > limit:
                raise too_large(source, name, f.size, limit)
            copy_capped(lambda n, f=f: remote(lambda: f.read(n)), dest / name, name, config.max_bytes, source)
            details[name] = f.details
    weights = details[WEIGHTS_FILE]
    revision = weights.get("VersionId") or (weights.get("ETag") or "").strip('"')
    logger.info("downloaded %s (weights revision %s)", source, revision)
    return FetchedAdapter(path=dest, resolved_revision=revision)


def _s3_error(e: Exception, source: str, config: SourceConfig) -> LoraplaneError:
    """Messages are built here from the error's type: S3 never sees the secret, but keep it that way."""
    endpoint = config.s3_endpoint_url or "AWS S3"
    if isinstance(e, FileExpired):
        return unreachable(source, f"an object under {source} changed during the download; try again")
    if isinstance(e, FileNotFoundError):
        return unreachable(source, f"{source} does not exist (no such bucket, or no objects under the prefix)")
    if isinstance(e, PermissionError):
        return unreachable(source, f"access to {source} was denied; check the S3 credentials and policy")
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return unreachable(source, "no usable AWS credentials: configure s3_key/s3_secret, the AWS "
                                   "environment or a profile, or s3_anon for public buckets")
    if isinstance(e, BotoCoreError):
        return unreachable(source, f"could not reach {endpoint}: {type(e).__name__}")
    if isinstance(e, TimeoutError):
        return unreachable(source, f"timed out after {config.timeout_s:g} s talking to {endpoint}")
    return unreachable(source, f"S3 request for {source} failed: {type(e).__name__}")
