"""Adapter source URIs: parsing, validation and the canonical form stored in the registry.

Accepted forms: "/abs/path", "file:///abs/path" (percent-encoded), "hf://org/repo",
"hf://org/repo@revision", "s3://bucket", "s3://bucket/prefix". Everything else is refused
with INVALID_SOURCE before any I/O, so a hostile string never reaches a filesystem or a URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from loraplane.errors import LoraplaneError
from loraplane.v1 import errors_pb2 as R

MAX_URI_CHARS = 1024
SCHEMES = ("file", "hf", "s3")

# Hub rules: ASCII letters, digits, '-', '_', '.'; no leading/trailing '-' or '.'; at most 96 chars.
_HF_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
# Branches, tags, PR refs ("refs/pr/3") and commit shas all fit; '@', ':', '~', '^' and spaces never occur.
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")
# AWS's "safe" key characters plus a few common ones; '?', '#', '*', '[' and '\\' would be read as
# version ids, fragments or globs by URL and fsspec parsers further down.
_S3_SEGMENT = re.compile(r"[A-Za-z0-9!_.'()=+@,: -]+")


@dataclass(frozen=True)
class SourceSpec:
    """Where an adapter comes from. Build it with `parse_source`, which validates every part."""

    scheme: str  # "file" | "hf" | "s3"
    location: str  # absolute path | "org/repo" | "bucket/prefix"
    revision: str = ""  # hf only: the revision asked for ("" = the default branch)

    def uri(self) -> str:
        """The canonical URI; `parse_source(spec.uri()) == spec` for every parsed spec."""
        if self.scheme == "file":
            return "file://" + quote(self.location, safe="/")
        if self.scheme == "hf" and self.revision:
            return f"hf://{self.location}@{self.revision}"
        return f"{self.scheme}://{self.location}"


def _invalid(message: str, field: str = "source") -> LoraplaneError:
    return LoraplaneError(R.ERROR_REASON_INVALID_SOURCE, message, {"field": field})


def _check_text(value: str, what: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"{what} is not valid UTF-8 text", field) from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise _invalid(f"{what} contains a control character (NUL, newline, ...)", field)


def parse_source(uri: str, revision: str = "") -> SourceSpec:
    """Parse and validate a source URI; `revision` (hf only) overrides an "@rev" suffix."""
    if not isinstance(uri, str) or not isinstance(revision, str):
        raise _invalid("source and revision must be strings")
    if not uri:
        raise _invalid("source is empty; give an absolute path, file://, hf:// or s3:// URI")
    if len(uri) > MAX_URI_CHARS:
        raise _invalid(f"source is {len(uri)} characters long; the limit is {MAX_URI_CHARS}")
    _check_text(uri, "source", "source")
    _check_text(revision, "revision", "revision")
    if uri.startswith("/"):
        spec = _file_spec(uri)
    elif "://" in uri:
        scheme, rest = uri.split("://", 1)
        scheme = scheme.lower()
        if scheme == "file":
            spec = _file_spec(_file_uri_path(rest))
        elif scheme == "hf":
            spec = _hf_spec(rest)
        elif scheme == "s3":
            spec = _s3_spec(rest)
        else:
            raise _invalid(f"unknown source scheme {scheme[:32]!r}; use file://, hf:// or s3://")
    else:
        raise _invalid("source must be an absolute path or a file://, hf:// or s3:// URI "
                       "(relative paths are refused)")
    if revision:
        if spec.scheme != "hf":
            raise _invalid(f"a revision applies to hf:// sources only, not {spec.scheme}://", "revision")
        spec = SourceSpec("hf", spec.location, _check_revision(revision, "revision"))
    if len(spec.uri()) > MAX_URI_CHARS:
        raise _invalid(f"source's canonical form is over {MAX_URI_CHARS} characters")
    return spec


def _file_uri_path(rest: str) -> str:
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost") or not slash:
        raise _invalid("file:// URIs must name a local absolute path (file:///path)")
    try:
        decoded = unquote("/" + path, errors="strict")
    except UnicodeDecodeError:
        raise _invalid("file:// path percent-decodes to invalid UTF-8") from None
    _check_text(decoded, "file:// path", "source")
    return decoded


def _file_spec(path: str) -> SourceSpec:
    # '//' and a trailing '/' mean nothing on Linux; dropping them keeps one canonical record per path.
    path = re.sub("/+", "/", path)
    if len(path) > 1:
        path = path.rstrip("/")
    return SourceSpec("file", path)


def _hf_spec(rest: str) -> SourceSpec:
    repo, at, revision = rest.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_HF_PART.fullmatch(p) for p in parts):
        raise _invalid(f"{repo[:200]!r} is not a Hugging Face repo id; use hf://org/name "
                       "(letters, digits, '-', '_', '.'; at most 96 characters each)")
    if any("--" in p or ".." in p for p in parts) or parts[1].endswith(".git"):
        raise _invalid(f"{repo!r} is not a valid Hugging Face repo id ('--', '..' and '.git' are refused)")
    if at and not revision:
        raise _invalid("hf:// source ends with '@' but names no revision")
    return SourceSpec("hf", repo, _check_revision(revision, "source") if revision else "")


def _check_revision(revision: str, field: str) -> str:
    if not _REVISION.fullmatch(revision):
        raise _invalid(f"{revision[:200]!r} is not a valid revision (a branch, tag, refs/pr/N or "
                       "commit sha: letters, digits, '.', '_', '-', '/')", field)
    if ".." in revision or "//" in revision or revision.endswith(("/", ".", ".lock")):
        raise _invalid(f"{revision!r} is not a valid git revision name", field)
    return revision


def _s3_spec(rest: str) -> SourceSpec:
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IPV4.fullmatch(bucket):
        raise _invalid(f"{bucket[:200]!r} is not a valid S3 bucket name (3-63 lowercase letters, "
                       "digits, '.', '-')")
    prefix = prefix.rstrip("/")
    if not prefix:
        return SourceSpec("s3", bucket)
    for segment in prefix.split("/"):
        if segment in ("", ".", ".."):
            raise _invalid("s3:// prefix must not contain empty, '.' or '..' path segments")
        if not _S3_SEGMENT.fullmatch(segment):
            raise _invalid(f"s3:// prefix segment {segment[:200]!r} has characters outside "
                           "letters, digits and !_.'()=+@,:- and space")
    return SourceSpec("s3", f"{bucket}/{prefix}")
