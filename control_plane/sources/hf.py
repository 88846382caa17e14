"""Hugging Face Hub sources: the revision is resolved to a commit sha once, and every file is read at it.

One `model_info(..., files_metadata=True)` call gives the commit sha and the file listing with
sizes together, so the refusals are made against the very commit that is then downloaded.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from control_plane.sources.adapter_files import (
    ADAPTER_FILES,
    FetchedAdapter,
    check_listing,
    check_written,
    size_limit,
    too_large,
    unreachable,
)
from control_plane.sources.config import SourceConfig
from control_plane.sources.spec import SourceSpec
from loraplane.errors import LoraplaneError

logger = logging.getLogger(__name__)

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
# The exceptions huggingface_hub raises for a hub that is down, slow, refusing us or inconsistent.
# (Plain OSError is left out on purpose: it is also what a full local disk raises.)
_HUB_ERRORS = (httpx2.HTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError, FileMetadataError)


class _ByteCap:
    """Stands in for tqdm in `hf_hub_download`: the download loop reports each chunk here before
    writing it, so raising stops a download that runs past the limit, whatever sizes were announced."""

    def __init__(self, *, limit: int, name: str, source: str, initial: int = 0, **_tqdm_kwargs):
        self.n = initial
        self.limit, self.name, self.source = limit, name, source

    def __enter__(self) -> _ByteCap:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n > self.limit:
            raise too_large(self.source, self.name, self.n, self.limit, streaming=True)

    def close(self) -> None:
        return None


def fetch_hf(spec: SourceSpec, config: SourceConfig, dest: Path) -> FetchedAdapter:
    source = spec.uri()
    repo = spec.location
    api = HfApi(endpoint=config.hf_endpoint, token=config.hf_token)
    try:
        info = api.model_info(repo, revision=spec.revision or None, files_metadata=True,
                              timeout=config.timeout_s)
    except _HUB_ERRORS as e:
        raise _hub_error(e, spec, api.endpoint, config) from e
    sha = info.sha or ""
    if not _COMMIT_SHA.fullmatch(sha):
        raise unreachable(source, f"the Hub at {api.endpoint} returned no commit sha for {repo}")
    # Only the top level counts: hf://org/name names the adapter at the repo root.
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) for s in info.siblings or ()}
    check_listing(sizes, config.max_bytes, source)
    logger.info("resolved %s to commit %s", source, sha)

    # A private local_dir and cache under dest: nothing is read from, or left in, the shared HF cache.
    work, cache = dest / ".hf-download", dest / ".hf-cache"
    try:
        for name in ADAPTER_FILES:
            cap = functools.partial(_ByteCap, limit=size_limit(name, config.max_bytes), name=name,
                                    source=source)
            try:
                path = hf_hub_download(repo, name, revision=sha, local_dir=work, cache_dir=cache,
                                       endpoint=config.hf_endpoint, token=config.hf_token,
                                       etag_timeout=config.timeout_s, tqdm_class=cap)
            except _HUB_ERRORS as e:
                raise _hub_error(e, spec, api.endpoint, config, sha) from e
            except OSError as e:
                if e.errno is not None:
                    raise  # the local disk (full, read-only): not the source's fault
                # errno-less OSErrors are huggingface_hub's own, e.g. its size consistency check.
                raise unreachable(source, f"{name} from {repo}@{sha} did not arrive as the Hub "
                                          "announced it (size mismatch or interrupted download)") from e
            check_written(Path(path), name, config.max_bytes, source)
            os.replace(path, dest / name)
    finally:
        # Scratch space only; the caller deletes dest (and anything left in it) either way.
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    logger.info("downloaded %s at commit %s", source, sha)
    return FetchedAdapter(path=dest, resolved_revision=sha)


def _hub_error(e: Exception, spec: SourceSpec, endpoint: str, config: SourceConfig,
               sha: str = "") -> LoraplaneError:
    """A SOURCE_UNREACHABLE naming what failed. Messages are built here, never copied from the
    library, so no header or token can end up in them."""
    source, repo = spec.uri(), spec.location
    at = f"{repo}@{sha}" if sha else source
    if isinstance(e, RevisionNotFoundError):
        revision = repr(spec.revision) if spec.revision else "the default branch"
        return unreachable(source, f"revision {revision} does not exist in Hugging Face repo {repo}")
    if isinstance(e, GatedRepoError):
        return unreachable(source, f"Hugging Face repo {repo} is gated; the configured token has no access")
    if isinstance(e, RepositoryNotFoundError):
        return unreachable(source, f"Hugging Face repo {repo} was not found at {endpoint}, or it is private "
                                   "and the configured token (HF_TOKEN) cannot read it")
    if isinstance(e, RemoteEntryNotFoundError):
        return unreachable(source, f"{at}: a listed file disappeared during the download")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "error"
        if status in (401, 403):
            return unreachable(source, f"the Hub at {endpoint} refused access to {repo} (HTTP {status}); "
                                       "check the configured token")
        return unreachable(source, f"the Hub at {endpoint} answered HTTP {status} for {at}")
    if isinstance(e, httpx2.TimeoutException):
        return unreachable(source, f"timed out after {config.timeout_s:g} s talking to the Hub at {endpoint}")
    if isinstance(e, OfflineModeIsEnabled):
        return unreachable(source, "HF_HUB_OFFLINE is set, so the Hub cannot be contacted")
    if isinstance(e, FileMetadataError):
        return unreachable(source, f"{endpoint} does not answer like a Hugging Face Hub for {at}")
    if isinstance(e, LocalEntryNotFoundError):
        return unreachable(source, f"could not download {at} from the Hub at {endpoint}")
    # Transport errors (refused, reset, DNS) name the host and the OS error, never a header.
    return unreachable(source, f"could not reach the Hub at {endpoint}: {type(e).__name__}: {str(e)[:200]}")
