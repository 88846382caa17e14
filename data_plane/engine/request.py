"""The request: the one object that crosses scheduler, model runner, sampler and output processing.

Also the sampling parameters it carries and the per-step output the engine returns for it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from loraplane.errors import invalid_argument


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # queued, or preempted (its KV freed; it will be recomputed)
    RUNNING = "running"      # holds KV blocks and, if it names one, its adapter's slot
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS, a stop token id or a stop string
    LENGTH = "length"        # max_tokens or max_model_len
    ABORT = "abort"


# Below this a temperature is greedy, as in vLLM: logits / 1e-45 overflow to inf, and the NaN
# probabilities that follow make torch.multinomial raise inside the step, failing the whole batch.
SAMPLING_EPS = 1e-5
# Stop strings and ids are checked on the engine thread at every token of the request, and the
# service takes requests from any client: bounded, so one request cannot slow every stream.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass(frozen=True)
class SamplingParams:
    """Defaults as the GenerationService proto: greedy, 16 tokens."""

    max_tokens: int = 16
    temperature: float = 0.0                 # below SAMPLING_EPS = greedy
    top_p: float = 1.0                       # in (0, 1]
    top_k: int = 0                           # 0 = off
    seed: int | None = None                  # same output whatever the batch around the request
    stop: tuple[str, ...] = ()               # stop strings, cut from the output text
    stop_token_ids: tuple[int, ...] = ()     # stop tokens, kept in the output token ids
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen, so a request's params never change under it.
        # One string is one stop string (as vLLM's str | list[str]), not its characters.
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    def validate(self, vocab_size: int) -> None:
        """Raise LoraplaneError(INVALID_ARGUMENT, field=...) on the first bad field."""
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise invalid_argument("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise invalid_argument("temperature", f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise invalid_argument("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise invalid_argument("top_k", f"top_k must be 0 (off) or >= 1, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise invalid_argument("seed", f"seed must be a 64-bit integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise invalid_argument("stop", "stop strings must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise invalid_argument("stop", f"at most {MAX_STOP_STRINGS} stop strings of at most "
                                           f"{MAX_STOP_STRING_CHARS} characters each")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise invalid_argument("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop token ids")
        if not all(_is_int(t) and 0 <= t < vocab_size for t in self.stop_token_ids):
            raise invalid_argument("stop_token_ids", f"stop token ids must be in [0, {vocab_size})")
        if not isinstance(self.ignore_eos, bool):
            raise invalid_argument("ignore_eos", "ignore_eos must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: str | None                       # adapter name; None = base model
    generator: torch.Generator | None = None  # per request: seeded sampling is batch-invariant
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache: the next step feeds from here. A prompt longer than a step's
    # token budget is fed in chunks; admission starts it past a cached prefix; a preempted request
    # starts again from 0 (recompute), or from its prefix if still cached.
    num_computed_tokens: int = 0
    # Prefix caching (block_manager.py): the digest of each full block of the sequence so far, what
    # they were computed with (the adapter as loaded), and how many of the blocks are registered.
    block_digests: list[bytes] = field(default_factory=list)
    digest_salt: bytes = b""
    num_committed_blocks: int = 0
    lora_slot: int = -1                       # set by the scheduler for each batch it is in
    num_preemptions: int = 0
    first_scheduled: float | None = None      # time.perf_counter() when a batch first took it
    # Output text: `text` is everything decoded (stop string cut off); `num_sent_chars` of it
    # have been streamed, the rest is held back while it could still become a stop string.
    text: str = ""
    num_sent_chars: int = 0
    num_sent_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the model has not seen yet: the prompt (or its rest), or the one a decode feeds."""
        return self.num_tokens - self.num_computed_tokens

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    def token_ids_from(self, start: int, count: int) -> list[int]:
        """Tokens [start, start + count) of prompt + output, without concatenating the two lists."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:start - n + count]
        return self.prompt_token_ids[start:start + count] + self.output_token_ids[:max(0, start + count - n)]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: a delta to relay, and the end when finished."""

    request_id: str
    token_ids: tuple[int, ...]               # tokens produced since the previous output
    text: str                                # text produced since the previous output (valid UTF-8)
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None
    first_scheduled: float | None = None     # time.perf_counter() when a batch first took the request


@dataclass(frozen=True)
class Completion:
    """One finished request, as `Engine.generate` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    adapter: str | None
