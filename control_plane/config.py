"""Control-plane configuration: one validated dataclass, and the CLI flags that fill it."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from loraplane.auth import check_token, load_token
from loraplane.grpc_server import HEALTH_LISTEN_HELP, check_address

DEFAULT_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "loraplane" / "control-plane"


@dataclass
class ControlPlaneConfig:
    base_model: str
    base_model_revision: str | None = None  # Hub branch, tag or commit of base_model (a Hub id)
    listen: str = "127.0.0.1:50051"
    redis_url: str | None = None
    redis_prefix: str = "loraplane"
    data_dir: Path = DEFAULT_DATA_DIR
    artifact_dir: Path | None = None
    admin_token: str | None = None
    distribution_token: str | None = None
    allowed_roots: tuple[Path, ...] = ()
    max_lora_rank: int = 64
    max_adapter_bytes: int = 2 << 30
    max_concurrent_ingests: int = 4
    artifact_dtype: str = "auto"
    hf_endpoint: str | None = None
    hf_token: str | None = None
    s3_endpoint_url: str | None = None
    s3_anon: bool = False
    source_timeout_s: float = 120.0
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    grace_period_s: float = 10.0
    lease_ms: int = 30_000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    health_listen: str | None = None

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ValueError("base_model is required (--base-model PATH_OR_ID)")
        self.base_model_revision = self.base_model_revision or None  # "" is the default branch, as unset
        check_address("listen", self.listen)
        if self.health_listen is not None:
            check_address("health_listen", self.health_listen)
        if not self.redis_prefix or any(c in self.redis_prefix for c in "{} "):
            raise ValueError("redis_prefix must be non-empty, without braces or spaces")
        if not 1 <= self.max_lora_rank <= 1024:
            raise ValueError(f"max_lora_rank must be in [1, 1024], got {self.max_lora_rank}")
        if self.max_adapter_bytes <= 0:
            raise ValueError("max_adapter_bytes must be positive")
        if self.max_concurrent_ingests < 1:
            raise ValueError("max_concurrent_ingests must be >= 1")
        if self.artifact_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"artifact_dtype must be auto, float32, float16 or bfloat16, got {self.artifact_dtype!r}")
        if self.lease_ms < 1000:
            raise ValueError("lease_ms must be >= 1000")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        for name in ("admin_token", "distribution_token"):
            if getattr(self, name) is not None:
                check_token(getattr(self, name), name)
        self.data_dir = Path(self.data_dir)
        self.artifact_dir = Path(self.artifact_dir) if self.artifact_dir else self.data_dir / "artifacts"
        self.allowed_roots = tuple(Path(r).resolve() for r in self.allowed_roots)

    def __repr__(self) -> str:
        # Tokens must never reach logs, even through a debug print of the config.
        shown = {k: ("***" if k.endswith("token") and v else v) for k, v in self.__dict__.items()}
        if self.redis_url:
            shown["redis_url"] = redact_url(self.redis_url)
        return f"ControlPlaneConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", required=True, help="base model directory or Hub id; adapters are validated against its config.json")
    p.add_argument("--base-model-revision",
                   help="Hub branch, tag or commit of --base-model when it is a Hub id: the one the data planes "
                        "serve (default: the default branch)")
    p.add_argument("--listen", default="127.0.0.1:50051", help="gRPC address (default: %(default)s)")
    p.add_argument("--redis-url", default=os.environ.get("LORAPLANE_REDIS_URL"),
                   help="Redis URL (env LORAPLANE_REDIS_URL); default: a private embedded Redis in --data-dir")
    p.add_argument("--redis-prefix", default="loraplane", help="key prefix in Redis (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="state directory (default: %(default)s)")
    p.add_argument("--artifact-dir", type=Path, help="artifact store (default: DATA_DIR/artifacts)")
    p.add_argument("--admin-token", help="admin bearer token (prefer env LORAPLANE_ADMIN_TOKEN or --admin-token-file)")
    p.add_argument("--admin-token-file", type=Path, help="file holding the admin token")
    p.add_argument("--distribution-token", help="token data planes must send (env LORAPLANE_DISTRIBUTION_TOKEN)")
    p.add_argument("--distribution-token-file", type=Path)
    p.add_argument("--allowed-root", action="append", type=Path, default=[], dest="allowed_roots",
                   help="directory local adapter sources may come from (repeatable); none = no local sources")
    p.add_argument("--max-lora-rank", type=int, default=64, help="largest rank accepted (default: %(default)s)")
    p.add_argument("--max-adapter-bytes", type=int, default=2 << 30, help="largest adapter accepted (default: 2 GiB)")
    p.add_argument("--max-concurrent-ingests", type=int, default=4, help="downloads/validations at once")
    p.add_argument("--artifact-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of normalized artifacts (auto keeps the adapter's own)")
    p.add_argument("--hf-endpoint", default=os.environ.get("HF_ENDPOINT"), help="Hub URL (env HF_ENDPOINT)")
    p.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3 endpoint (env AWS_ENDPOINT_URL)")
    p.add_argument("--s3-anon", action="store_true", help="anonymous S3 access")
    p.add_argument("--grace-period", type=float, default=10.0, help="seconds to finish in-flight calls on SIGTERM")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="CA for client certificates: enables mTLS")
    p.add_argument("--health-listen", help=HEALTH_LISTEN_HELP)


def from_args(args: argparse.Namespace) -> ControlPlaneConfig:
    return ControlPlaneConfig(
        base_model=args.base_model, base_model_revision=args.base_model_revision, listen=args.listen,
        redis_url=args.redis_url, redis_prefix=args.redis_prefix,
        data_dir=args.data_dir, artifact_dir=args.artifact_dir,
        admin_token=load_token(args.admin_token, "LORAPLANE_ADMIN_TOKEN", args.admin_token_file),
        distribution_token=load_token(args.distribution_token, "LORAPLANE_DISTRIBUTION_TOKEN",
                                      args.distribution_token_file),
        allowed_roots=tuple(args.allowed_roots), max_lora_rank=args.max_lora_rank,
        max_adapter_bytes=args.max_adapter_bytes, max_concurrent_ingests=args.max_concurrent_ingests,
        artifact_dtype=args.artifact_dtype, hf_endpoint=args.hf_endpoint, hf_token=os.environ.get("HF_TOKEN"),
        s3_endpoint_url=args.s3_endpoint_url, s3_anon=args.s3_anon, grace_period_s=args.grace_period,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        health_listen=args.health_listen,
    )
