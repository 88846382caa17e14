"""Workloads: which adapter each request names, when it arrives, how long its prompt and output are.

Everything is drawn from one seeded numpy Generator, so a workload is a pure function of its
parameters: two peers given the same Workload see the same requests in the same order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

RANK_CHOICES = (8, 16, 32, 64)   # "mixed" ranks are drawn from these


@dataclass(frozen=True)
class LengthDist:
    """Token counts: "64" (fixed), "16-128" (uniform, inclusive) or "exp:64" (exponential mean, >= 1)."""

    kind: str
    a: int
    b: int = 0

    @classmethod
    def parse(cls, text: str | int) -> LengthDist:
        text = str(text).strip()
        if re.fullmatch(r"\d+", text):
            return cls("fixed", int(text))
        if m := re.fullmatch(r"(\d+)-(\d+)", text):
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ValueError(f"length range {text!r} is empty")
            return cls("uniform", lo, hi)
        if m := re.fullmatch(r"exp:(\d+)", text):
            return cls("exp", int(m.group(1)))
        raise ValueError(f"length {text!r}: expected N, LO-HI or exp:MEAN")

    def __post_init__(self) -> None:
        if self.a < 1:
            raise ValueError("lengths must be at least 1 token")

    @property
    def max(self) -> int:
        # exp is capped at 4x its mean so max_model_len stays bounded.
        return {"fixed": self.a, "uniform": self.b, "exp": 4 * self.a}[self.kind]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.a, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.a, self.b + 1, size=n)
        return np.clip(np.ceil(rng.exponential(self.a, size=n)), 1, self.max).astype(np.int64)

    def __str__(self) -> str:
        return {"fixed": f"{self.a}", "uniform": f"{self.a}-{self.b}", "exp": f"exp:{self.a}"}[self.kind]


def popularity(num_adapters: int, kind: str, skew: float = 1.0) -> np.ndarray:
    """P(request names adapter i): uniform, or Zipf/power law p_i ~ 1 / (i + 1)^skew."""
    if num_adapters < 1:
        raise ValueError("need at least one adapter")
    if kind == "uniform":
        return np.full(num_adapters, 1.0 / num_adapters)
    if kind == "zipf":
        if skew < 0:
            raise ValueError("the Zipf exponent must be >= 0")
        w = 1.0 / np.arange(1, num_adapters + 1, dtype=np.float64) ** skew
        return w / w.sum()
    raise ValueError(f"popularity must be uniform or zipf, got {kind!r}")


def adapter_ranks(num_adapters: int, ranks: str, seed: int = 0) -> list[int]:
    """"16" gives every adapter rank 16; "mixed" draws each from RANK_CHOICES (seeded)."""
    if ranks == "mixed":
        rng = np.random.default_rng(seed + 17)
        return [int(r) for r in rng.choice(RANK_CHOICES, size=num_adapters)]
    return [int(ranks)] * num_adapters


@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float | None      # offset from the start (Poisson), None for closed loop
    prompt: list[int]
    max_tokens: int
    adapter: str | None          # "a{i}", or None for the base model


@dataclass(frozen=True)
class Workload:
    num_requests: int = 64
    num_adapters: int = 8          # 0: every request runs on the base model
    popularity: str = "uniform"    # uniform | zipf | round_robin (request i -> adapter i mod n)
    skew: float = 1.0              # Zipf exponent
    arrival: str = "closed"        # closed (at `concurrency`) | poisson (at `rate` requests/s)
    concurrency: int = 32
    rate: float = 4.0
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 64))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 32))
    ranks: str = "16"              # fixed rank, or "mixed" (8..64): what the target's adapters are, for describe()
    vocab_size: int = 32000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1 or self.num_adapters < 0:
            raise ValueError("need num_requests >= 1 and num_adapters >= 0")
        if self.arrival not in ("closed", "poisson"):
            raise ValueError(f"arrival must be closed or poisson, got {self.arrival!r}")
        if self.arrival == "closed" and self.concurrency < 1:
            raise ValueError("closed-loop concurrency must be >= 1")
        if self.arrival == "poisson" and not self.rate > 0:
            raise ValueError("the Poisson rate must be > 0")

    def with_(self, **changes) -> Workload:
        return replace(self, **changes)

    @property
    def max_model_len(self) -> int:
        return self.prompt_len.max + self.output_len.max

    def adapter_choices(self, rng: np.random.Generator) -> list[str | None]:
        n = self.num_adapters
        if n == 0:
            return [None] * self.num_requests
        if self.popularity == "round_robin":
            return [f"a{i % n}" for i in range(self.num_requests)]
        picks = rng.choice(n, size=self.num_requests, p=popularity(n, self.popularity, self.skew))
        return [f"a{i}" for i in picks]

    def requests(self) -> list[Request]:
        rng = np.random.default_rng(self.seed)
        adapters = self.adapter_choices(rng)
        prompts = self.prompt_len.sample(rng, self.num_requests)
        outputs = self.output_len.sample(rng, self.num_requests)
        if self.arrival == "poisson":
            arrivals = np.cumsum(rng.exponential(1.0 / self.rate, size=self.num_requests)).tolist()
        else:
            arrivals = [None] * self.num_requests
        return [Request(i, arrivals[i], rng.integers(0, self.vocab_size, size=int(prompts[i])).tolist(),
                        int(outputs[i]), adapters[i]) for i in range(self.num_requests)]

    def tokens_per_step_bound(self, max_loras: int, max_num_seqs: int | None = None) -> float:
        """The most output tokens per engine step any scheduler could reach on these requests, with
        every request known in advance (closed loop: at most `concurrency` in flight).

        A request takes one step per output token and runs only while its adapter holds one of the
        `max_loras` slots, so adapter a is in at least max(its requests' outputs) steps, and a step
        holds at most max_loras adapters; a step also runs at most concurrency (and max_num_seqs)
        requests. Steps >= both counts, and tokens / steps <= this.
        """
        reqs = self.requests()
        tokens = sum(r.max_tokens for r in reqs)
        longest: dict[str, int] = {}
        for r in reqs:
            if r.adapter is not None:
                longest[r.adapter] = max(longest.get(r.adapter, 0), r.max_tokens)
        width = self.num_requests if self.arrival == "poisson" else min(self.concurrency, self.num_requests)
        if max_num_seqs is not None:
            width = min(width, max_num_seqs)
        steps = tokens / width
        if longest:
            if max_loras < 1:
                raise ValueError("requests name adapters but max_loras < 1: none could run")
            steps = max(steps, sum(longest.values()) / max_loras)
        return tokens / steps

    def describe(self) -> str:
        pop = self.popularity if self.popularity != "zipf" else f"zipf(s={self.skew:g})"
        load = (f"closed loop at concurrency {self.concurrency}" if self.arrival == "closed"
                else f"Poisson arrivals at {self.rate:g} req/s")
        return (f"{self.num_requests} requests, {self.num_adapters} adapters ({pop}, rank {self.ranks}), {load}, "
                f"prompt {self.prompt_len} tokens, output {self.output_len} tokens, seed {self.seed}")
