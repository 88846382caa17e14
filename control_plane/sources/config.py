"""Settings shared by every source: allow-listed roots, credentials, endpoints and limits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


def _check_url(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValueError(f"{name} must be an http:// or https:// URL")
    if "@" in urlsplit(value).netloc:
        # The endpoint is quoted in source errors, which reach records, clients and logs.
        raise ValueError(f"{name} must not carry credentials (user:password@); give them as the "
                         "source's token or keys (HF_TOKEN, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    return value.rstrip("/")


@dataclass(frozen=True)
class SourceConfig:
    """Validated on construction (ValueError). Secrets are left out of repr so they never reach a log."""

    # Local sources must resolve (symlinks resolved) inside one of these; none configured = no local sources.
    allowed_roots: tuple[Path, ...] = ()
    # None: huggingface_hub's own chain (HF_TOKEN, then the saved login).
    hf_token: str | None = field(default=None, repr=False)
    # None: HF_ENDPOINT, else huggingface.co.
    hf_endpoint: str | None = None
    s3_endpoint_url: str | None = None
    s3_anon: bool = False
    # None: the usual AWS chain (env, shared files, instance metadata).
    s3_key: str | None = field(default=None, repr=False)
    s3_secret: str | None = field(default=None, repr=False)
    # Largest adapter_model.safetensors accepted, checked before and while downloading.
    max_bytes: int = 2 << 30
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        roots = self.allowed_roots
        if isinstance(roots, (str, Path)):
            raise ValueError("allowed_roots must be a sequence of paths, not one path")
        roots = tuple(Path(r) for r in roots)
        for root in roots:
            if not root.is_absolute():
                raise ValueError(f"allowed root {str(root)!r} must be an absolute path")
        object.__setattr__(self, "allowed_roots", roots)
        object.__setattr__(self, "hf_endpoint", _check_url("hf_endpoint", self.hf_endpoint))
        object.__setattr__(self, "s3_endpoint_url", _check_url("s3_endpoint_url", self.s3_endpoint_url))
        for name in ("hf_token", "s3_key", "s3_secret"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or None")
        if (self.s3_key is None) != (self.s3_secret is None):
            raise ValueError("s3_key and s3_secret must be given together")
        if self.s3_anon and self.s3_key is not None:
            raise ValueError("s3_anon and s3_key/s3_secret exclude each other")
        if not isinstance(self.max_bytes, int) or isinstance(self.max_bytes, bool) or self.max_bytes <= 0:
            raise ValueError("max_bytes must be a positive integer")
        if (not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool)
                or not math.isfinite(self.timeout_s) or self.timeout_s <= 0):
            raise ValueError("timeout_s must be a positive number of seconds")
