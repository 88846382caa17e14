"""Suite profiles: the quick CPU run on the bench model (the default) and the full GPU run (--gpu)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.artifacts import BENCH_MODEL, GPU_MODEL
from bench.workloads import LengthDist


@dataclass(frozen=True)
class Profile:
    name: str
    model: dict
    dtype: str
    device: str
    threads: int | None            # torch intra-op threads (None: leave torch's default)
    rank: int = 16
    prompt_len: str = "64"
    output_len: str = "32"
    concurrency: int = 32          # closed-loop requests in flight
    peer_requests: int = 32        # requests per peer run (HF + PEFT runs them as static batches)
    peer_adapters: int = 8         # distinct adapters in the peers' mixed batches
    peer_var_requests: int = 64    # the peers' variable-length workload
    peer_var_prompt: str = "32-96"
    peer_var_output: str = "8-64"
    peer_repeats: int = 3
    sweep_requests: int = 64
    many_requests: int = 96        # requests per point of the total-adapters and skew sweeps
    distinct: tuple[int, ...] = (1, 8, 32)
    totals: tuple[int, ...] = (8, 64, 256, 1000)
    skews: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)
    skew_adapters: int = 1000
    many_max_loras: int = 8
    many_max_cpu_loras: int = 64
    disk_tier_bytes: int = 20 << 30   # the data plane's default disk-tier budget
    memory_ranks: tuple[int, ...] = (8, 16, 32, 64)
    repeats: int = 2               # interleaved repeats of every compared configuration
    resident: bool = True          # keep the compared engines loaded side by side between runs
    lazy_store: bool = False       # generate adapters on first fetch instead of writing them all up front
    service: bool = True           # the gRPC service point (control plane + data plane processes)
    service_requests: int = 48
    service_rate: float = 2.5      # Poisson arrivals, requests/s
    slo_ttft_ms: float = 5000.0
    slo_tpot_ms: float = 200.0

    @property
    def prompt(self) -> LengthDist:
        return LengthDist.parse(self.prompt_len)

    @property
    def output(self) -> LengthDist:
        return LengthDist.parse(self.output_len)

    @property
    def max_model_len(self) -> int:
        prompt = max(self.prompt.max, LengthDist.parse(self.peer_var_prompt).max)
        return prompt + max(self.output.max, LengthDist.parse(self.peer_var_output).max)

    def with_(self, **changes) -> Profile:
        return replace(self, **changes)


# Sizes are cut to fit about 15 minutes on 2 shared CPU cores: 32-64 requests per run, 32 output tokens.
CPU = Profile(name="cpu", model=BENCH_MODEL, dtype="float32", device="cpu", threads=2)

# Llama-3-8B shapes, bf16, one GPU. 1,000 rank-16 adapters of 8B are 84 GB, so the origin
# generates each on its first fetch (lazy_store) rather than writing them all first; four 16 GB
# models (LoRA engine, base, merged, HF) do not fit one 80 GB GPU together, so each run loads its own;
# the disk tier gets 8 GiB so model + merged model + tier fit a 64 GB disk.
GPU = Profile(name="gpu", model=GPU_MODEL, dtype="bfloat16", device="cuda", threads=None,
              prompt_len="256", output_len="128", concurrency=64, peer_requests=64, peer_adapters=32,
              peer_var_requests=256, peer_var_prompt="128-512", peer_var_output="32-256",
              sweep_requests=256, many_requests=512, repeats=3, resident=False, lazy_store=True, service=False,
              disk_tier_bytes=8 << 30,
              slo_ttft_ms=500.0, slo_tpot_ms=50.0)

PROFILES = {"cpu": CPU, "gpu": GPU}
