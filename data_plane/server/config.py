"""Data-plane configuration: one validated dataclass, and the CLI flags (vLLM's names) that fill it."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from data_plane.lora.fetcher import FetcherConfig
from loraplane.auth import check_token, load_token
from loraplane.grpc_server import HEALTH_LISTEN_HELP, check_address
from loraplane.tls import ClientTlsFiles

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraplane" / "adapters"


@dataclass
class DataPlaneConfig:
    model: str
    control_plane: str
    listen: str = "127.0.0.1:50052"
    redis_url: str | None = None
    redis_prefix: str = "loraplane"
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    advertise_address: str | None = None
    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int = 64
    max_cpu_lora_bytes: int = 4 << 30
    max_pinned_loras: int | None = None
    disk_cache_dir: Path = DEFAULT_CACHE_DIR
    disk_cache_bytes: int = 20 << 30
    max_num_seqs: int = 64
    max_model_len: int = 2048
    max_num_batched_tokens: int | None = None  # None: the engine's default, max(max_model_len, 2048)
    enable_prefix_caching: bool = True
    dtype: str = "auto"
    device: str = "auto"
    kv_cache_bytes: int | None = None
    distribution_token: str | None = None
    admin_token: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # "::" on IPv6-only clusters
    grace_period_s: float = 30.0
    heartbeat_s: float = 2.0
    fetch_timeout_s: float = 30.0
    fetch_retries: int = 3
    control_plane_tls: bool = False  # TLS verified against the system's roots (a CA file implies TLS with it)
    control_plane_ca: Path | None = None
    control_plane_client_cert: Path | None = None
    control_plane_client_key: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    health_listen: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required (--model PATH)")
        if not self.control_plane:
            raise ValueError("control_plane is required (--control-plane HOST:PORT)")
        check_address("listen", self.listen)
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras", "max_num_seqs", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("admin_token", "distribution_token"):
            if getattr(self, name) is not None:
                check_token(getattr(self, name), name)
        budget = self.max_num_batched_tokens
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            raise ValueError(f"max_num_batched_tokens must be an integer >= 1, got {budget!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {self.enable_prefix_caching!r}")
        if self.max_cpu_loras < self.max_loras:
            # As in vLLM: every adapter in a GPU slot is also held in the CPU tier.
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.max_pinned_loras is None:
            self.max_pinned_loras = self.max_loras // 2
        if not 0 <= self.max_pinned_loras <= self.max_loras:
            raise ValueError(f"max_pinned_loras must be in [0, max_loras], got {self.max_pinned_loras}")
        if self.max_cpu_lora_bytes < 1 or self.disk_cache_bytes < 0:
            raise ValueError("max_cpu_lora_bytes must be >= 1 and disk_cache_bytes >= 0")
        if self.heartbeat_s <= 0 or self.grace_period_s < 0:
            raise ValueError("heartbeat_s must be > 0 and grace_period_s >= 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be a port number")
        if not isinstance(self.control_plane_tls, bool):
            raise ValueError(f"control_plane_tls must be True or False, got {self.control_plane_tls!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if bool(self.control_plane_client_cert) != bool(self.control_plane_client_key):
            raise ValueError("control_plane_client_cert and control_plane_client_key go together")
        if self.tls_client_ca and not self.tls_cert:
            # Without a server certificate the server would listen in plaintext, with no mTLS at all.
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if self.health_listen is not None:
            check_address("health_listen", self.health_listen)
        import torch

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device}: this torch has no usable CUDA device; use --device cpu")
        self.disk_cache_dir = Path(self.disk_cache_dir)

    def fetcher_config(self) -> FetcherConfig:
        """How this data plane reaches the control plane: plaintext, TLS with the system's roots, or
        TLS with the given CA (and client certificate), followed as those files rotate."""
        files = (ClientTlsFiles(self.control_plane_ca, self.control_plane_client_cert, self.control_plane_client_key)
                 if self.control_plane_ca or self.control_plane_client_cert else None)
        return FetcherConfig(self.control_plane, self.distribution_token, tls_files=files, tls=self.control_plane_tls,
                             timeout_s=self.fetch_timeout_s, retries=self.fetch_retries)

    def __repr__(self) -> str:
        shown = {k: ("***" if k.endswith("token") and v else v) for k, v in self.__dict__.items()}
        return f"DataPlaneConfig({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model directory (config.json + safetensors + tokenizer)")
    p.add_argument("--control-plane", default=os.environ.get("LORAPLANE_CONTROL_PLANE", "127.0.0.1:50051"),
                   help="control plane address (env LORAPLANE_CONTROL_PLANE, default %(default)s)")
    p.add_argument("--listen", default="127.0.0.1:50052", help="gRPC address (default %(default)s)")
    p.add_argument("--redis-url", default=os.environ.get("LORAPLANE_REDIS_URL"),
                   help="registry Redis, for events and heartbeats (env LORAPLANE_REDIS_URL); none = no events")
    p.add_argument("--redis-prefix", default="loraplane")
    p.add_argument("--replica-id", default=None, help="name in heartbeats (default: host-pid)")
    p.add_argument("--advertise-address", help="address other services should use to reach this replica")
    p.add_argument("--max-loras", type=int, default=8, help="GPU LoRA slots = distinct adapters per batch")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-cpu-loras", type=int, default=64, help="adapters kept in host memory")
    p.add_argument("--max-cpu-lora-bytes", type=int, default=4 << 30, help="host memory for adapters")
    p.add_argument("--max-pinned-loras", type=int, help="GPU slots pinned adapters may hold (default max_loras/2)")
    p.add_argument("--disk-cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    p.add_argument("--disk-cache-bytes", type=int, default=20 << 30, help="0 disables the disk tier")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens one engine step carries, decodes included; longer prompts are fed in chunks "
                        "over several steps (default: max(max-model-len, 2048))")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompt prefixes computed before, on the same adapter (default on)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--kv-cache-bytes", type=int, help="KV cache budget (default: room for max-num-seqs full requests)")
    p.add_argument("--distribution-token", help="token for the control plane's distribution API")
    p.add_argument("--distribution-token-file", type=Path)
    p.add_argument("--admin-token", help="token required on AdapterCacheService (env LORAPLANE_ADMIN_TOKEN)")
    p.add_argument("--admin-token-file", type=Path)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", default="0.0.0.0",
                   help="address the /metrics server binds (default: %(default)s; :: on IPv6-only clusters)")
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight streams get on SIGTERM")
    p.add_argument("--control-plane-tls", action="store_true",
                   help="TLS to the control plane, verified against the system's trust store (for a control plane "
                        "behind a publicly trusted certificate); --control-plane-ca gives a CA of your own instead")
    p.add_argument("--control-plane-ca", type=Path, help="CA to verify the control plane's TLS certificate")
    p.add_argument("--control-plane-client-cert", type=Path,
                   help="client certificate (PEM) for a control plane that requires mTLS")
    p.add_argument("--control-plane-client-key", type=Path, help="its private key (PEM)")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-client-ca", type=Path, help="CA for client certificates: enables mTLS")
    p.add_argument("--health-listen", help=HEALTH_LISTEN_HELP)


def from_args(args: argparse.Namespace) -> DataPlaneConfig:
    extra = {"replica_id": args.replica_id} if args.replica_id else {}
    return DataPlaneConfig(
        model=args.model, control_plane=args.control_plane, listen=args.listen, redis_url=args.redis_url,
        redis_prefix=args.redis_prefix, advertise_address=args.advertise_address, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
        max_cpu_lora_bytes=args.max_cpu_lora_bytes, max_pinned_loras=args.max_pinned_loras,
        disk_cache_dir=args.disk_cache_dir, disk_cache_bytes=args.disk_cache_bytes, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching, dtype=args.dtype,
        device=args.device, kv_cache_bytes=args.kv_cache_bytes,
        distribution_token=load_token(args.distribution_token, "LORAPLANE_DISTRIBUTION_TOKEN",
                                      args.distribution_token_file),
        admin_token=load_token(args.admin_token, "LORAPLANE_ADMIN_TOKEN", args.admin_token_file),
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, grace_period_s=args.grace_period, control_plane_tls=args.control_plane_tls,
        control_plane_ca=args.control_plane_ca,
        control_plane_client_cert=args.control_plane_client_cert, control_plane_client_key=args.control_plane_client_key,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        health_listen=args.health_listen, **extra)
