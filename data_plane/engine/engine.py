"""The in-process engine: add requests, step, read per-step deltas.

    engine = Engine(EngineConfig(model="path/to/hf-dir", max_loras=4))
    engine.load_adapter("support-bot", slot=0, adapter=normalized)   # the adapter cache's hook
    rid = engine.add_request("Hello", SamplingParams(max_tokens=32), adapter="support-bot")
    while engine.has_unfinished():
        for out in engine.step(): ...                                 # RequestOutput deltas

A step is schedule() -> run(batch) -> postprocess(). The engine is not thread-safe: a server
runs it in one thread and hands it add/abort/load/evict calls between steps.

Adapter residency: a request names an adapter; it runs only while that name is mapped to a
LoRA slot. The adapter cache owns the mapping through `load_adapter(name, slot, adapter)` and
`evict_adapter(name)`; `waiting_adapters()` says which adapters queued requests wait for and
`adapters_in_use()` which ones must not be evicted now.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid

import torch

from data_plane.engine.block_manager import BlockManager
from data_plane.engine.config import DTYPES, EngineConfig
from data_plane.engine.detokenizer import IncrementalDetokenizer, load_tokenizer
from data_plane.engine.kv_cache import KVCache, num_blocks
from data_plane.engine.model_runner import ModelRunner
from data_plane.engine.output_processor import OutputProcessor
from data_plane.engine.request import (
    Completion,
    FinishReason,
    Request,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from data_plane.engine.scheduler import Batch, Scheduler
from data_plane.lora.layers import LoraSlots
from data_plane.models.config import ModelArgs
from data_plane.models.llama import PACKED_MODULES
from data_plane.models.loader import load_model
from data_plane.models.onednn_linear import use_onednn_linears
from kernels import cpu_kernel
from loraplane.adapter_format import NormalizedAdapter
from loraplane.errors import LoraplaneError, invalid_argument
from loraplane.v1 import errors_pb2 as R


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.args = ModelArgs.from_dir(config.model)
        self.spec = self.args.spec
        self.dtype = DTYPES[config.dtype if config.dtype != "auto" else self._auto_dtype()]
        device = config.torch_device
        self.model = load_model(config.model, self.args, self.dtype, device, config.max_model_len)
        self.loras: LoraSlots | None = None
        if config.max_loras:
            self.loras = LoraSlots(self.model, self.spec, PACKED_MODULES, config.max_loras, config.max_lora_rank)
        if device.type == "cpu":  # built here, not in the first step (~30 s on first use per host)
            cpu_kernel.extension()
        use_onednn_linears(self.model, device, self.dtype)  # after LoRA wraps them: it swaps the wrapped bases too
        blocks = num_blocks(config, self.spec, self.dtype)
        self.kv = KVCache.allocate(self.spec, blocks, config.kv_block_size, self.dtype, device)
        self.blocks = BlockManager(blocks, config.kv_block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        self.runner = ModelRunner(self.model, self.kv, config.kv_block_size, self.loras, device)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        if config.tokenizer and self.tokenizer is None:
            # Asked for by name: a mistyped path must not quietly make this a token-ids-only engine.
            raise ValueError(f"tokenizer: no tokenizer files in {config.tokenizer}")
        eos = set(self.args.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.outputs = OutputProcessor(tuple(sorted(eos)), config.max_model_len)
        self._requests: dict[str, Request] = {}
        self._aborted: list[RequestOutput] = []
        # Whether the last step ran a batch. A step can run and yield no output (every request in
        # it fed a chunk of its prompt), so "no output" does not mean "nothing can run".
        self.last_step_ran = False

    def _auto_dtype(self) -> str:
        return self.args.dtype if self.args.dtype in DTYPES else "float32"

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    adapter: str | None = None, request_id: str | None = None) -> str:
        """Queue a request; every check runs before any state changes. Returns its id."""
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise invalid_argument("sampling", f"sampling must be SamplingParams, got {type(sampling).__name__}")
        if request_id is None:
            request_id = uuid.uuid4().hex
        if (not isinstance(request_id, str) or not request_id or request_id in self._requests
                or any(out.request_id == request_id for out in self._aborted)):  # its ABORT is still due
            raise invalid_argument("request_id", f"request_id must be a new non-empty string, got {request_id!r}")
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise invalid_argument("adapter", "adapter must be a non-empty name, or None for the base model")
        if adapter is not None and self.loras is None:
            raise invalid_argument("adapter", "this engine has max_loras=0: LoRA adapters are disabled")
        token_ids = self.check_request(prompt, sampling)
        request = Request(request_id, token_ids, sampling, adapter, generator=self._generator(sampling.seed))
        detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids) if self.tokenizer is not None else None
        self.outputs.track(request, detokenizer)
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def check_request(self, prompt: str | list[int], sampling: SamplingParams) -> list[int]:
        """The prompt's token ids once prompt and sampling are known to be valid (LoraplaneError if not).

        It reads only what never changes after start (tokenizer, vocabulary, max_model_len), so any
        thread may call it: the service does, to tokenize off the engine thread (a long prompt there
        would hold every stream's next step) and to refuse a bad request before its adapter loads.
        """
        sampling.validate(self.spec.vocab_size)
        if sampling.stop and self.tokenizer is None:
            raise invalid_argument("stop", "stop strings need a tokenizer and this model has none; use stop_token_ids")
        return self._prompt_token_ids(prompt)

    def _prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise invalid_argument("prompt", "this model has no tokenizer: give prompt token ids")
            token_ids = list(self.tokenizer(prompt).input_ids)
            # A tokenizer with added tokens the embeddings never grew for: an id past the vocabulary
            # would fail the whole step, every co-batched request with it.
            if any(not 0 <= t < self.spec.vocab_size for t in token_ids):
                raise invalid_argument("prompt", f"the prompt tokenizes to ids outside the model's vocabulary "
                                                 f"[0, {self.spec.vocab_size}); the tokenizer does not match the model")
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            token_ids = list(prompt)
            if any(not 0 <= t < self.spec.vocab_size for t in token_ids):
                raise invalid_argument("prompt_token_ids", f"token ids must be in [0, {self.spec.vocab_size})")
        else:
            raise invalid_argument("prompt", "prompt must be a string or a list of token ids")
        if not token_ids:
            raise invalid_argument("prompt", "the prompt is empty")
        if len(token_ids) > self.config.max_model_len:
            raise LoraplaneError(R.ERROR_REASON_PROMPT_TOO_LONG,
                                 f"prompt is {len(token_ids)} tokens, max_model_len is {self.config.max_model_len}",
                                 {"field": "prompt" if isinstance(prompt, str) else "prompt_token_ids",
                                  "prompt_tokens": str(len(token_ids)),
                                  "max_model_len": str(self.config.max_model_len)})
        return token_ids

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.config.torch_device)
        if seed is None:
            seed = secrets.randbits(63)
        elif generator.device.type == "cpu" and not 0 <= seed < 2**32:
            # The CPU generator keeps a seed's low 32 bits only: 7 and 7 + 2**32 sampled alike.
            # Seeds past 32 bits are hashed down instead (CUDA's generator takes all 64).
            seed = int.from_bytes(hashlib.blake2b((seed % 2**64).to_bytes(8, "little"), digest_size=4).digest(),
                                  "little")
        generator.manual_seed(seed)
        return generator

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; its final output (ABORT) comes with the next step."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.finish(request)
        request.finish_reason = FinishReason.ABORT
        self._aborted.append(self.outputs.output(request, FinishReason.ABORT))
        self.outputs.forget(request)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # ---- the step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine iteration; the deltas of every request that produced a token or finished."""
        batch = self.scheduler.schedule()
        self.last_step_ran = batch is not None
        produced = self.postprocess(batch, self.runner.run(batch)) if batch is not None else []
        # Taken only once the batch ran: if it raised, the aborted requests' final outputs come with
        # the next step instead of being lost (their streams would never be closed).
        outputs, self._aborted = self._aborted, []
        return outputs + produced

    def postprocess(self, batch: Batch, token_ids: list[int]) -> list[RequestOutput]:
        """token_ids: one per request that batch.sample picks; the others fed a chunk of their prompt."""
        outputs = []
        sampled = [r for r, s in zip(batch.requests, batch.sample, strict=True) if s]
        for request, n in zip(batch.requests, batch.num_new, strict=True):
            request.num_computed_tokens += n
            self.blocks.commit(request)  # before a finished request frees its blocks
        for request, token_id in zip(sampled, token_ids, strict=True):
            reason = self.outputs.append_token(request, token_id)
            outputs.append(self.outputs.output(request, reason))
            if reason is not None:
                request.finish_reason = reason
                self.scheduler.finish(request)
                self.outputs.forget(request)
                del self._requests[request.request_id]
        return outputs

    # ---- adapter residency (the adapter cache's hooks) -------------------------------------

    def load_adapter(self, name: str, slot: int, adapter: NormalizedAdapter, cache_salt: bytes | None = None) -> None:
        """Copy `adapter` into `slot` and route requests naming `name` to it.

        Whatever adapter held the slot before is evicted; refused if running requests use it.
        `cache_salt` names these weights for prefix caching: give the same bytes only for the same
        weights (the data plane gives its content-addressed key), and cached KV survives the adapter
        being evicted and loaded again. None: fresh random bytes, so nothing computed with other
        weights under this name is reused.
        """
        if self.loras is None:
            raise invalid_argument("slot", "this engine has max_loras=0: no LoRA slots")
        if not isinstance(name, str) or not name:
            raise invalid_argument("adapter", "adapter name must be a non-empty string")
        self.loras.check_slot(slot)
        slots = self.scheduler.adapter_slots
        # The slot's adapter, and this name's old slot; one name when a name is loaded again in its slot.
        previous = list(dict.fromkeys([n for n, s in slots.items() if s == slot] + ([name] if name in slots else [])))
        busy = set(previous) & self.scheduler.adapters_in_use()
        if busy:
            raise LoraplaneError(R.ERROR_REASON_CAPACITY_EXHAUSTED,
                                 f"adapter {sorted(busy)[0]} is in use by running requests",
                                 {"adapter": sorted(busy)[0]})
        self.loras.load_adapter(slot, adapter)  # validates before writing: state unchanged on error
        for old in previous:
            del slots[old]
            self.scheduler.adapter_salts.pop(old, None)
        slots[name] = slot
        self.scheduler.adapter_salts[name] = b"adapter:" + (cache_salt if cache_salt is not None else os.urandom(16))

    def check_adapter(self, adapter: NormalizedAdapter) -> None:
        """Raise what load_adapter would for these weights (rank, shapes); safe from any thread."""
        if self.loras is None:
            raise invalid_argument("adapter", "this engine has max_loras=0: LoRA adapters are disabled")
        self.loras.check_adapter(adapter)

    def evict_adapter(self, name: str) -> int:
        """Unmap `name` and clear its slot; returns the freed slot. Refused while running requests use it."""
        slots = self.scheduler.adapter_slots
        if name not in slots:
            raise invalid_argument("adapter", f"adapter {name!r} is not in a slot")
        if name in self.scheduler.adapters_in_use():
            raise LoraplaneError(R.ERROR_REASON_CAPACITY_EXHAUSTED,
                                 f"adapter {name} is in use by running requests", {"adapter": name})
        slot = slots.pop(name)
        self.scheduler.adapter_salts.pop(name, None)
        self.loras.clear_slot(slot)
        return slot

    @property
    def adapter_slots(self) -> dict[str, int]:
        return dict(self.scheduler.adapter_slots)

    def adapters_in_use(self) -> set[str]:
        return self.scheduler.adapters_in_use()

    def waiting_adapters(self) -> list[str]:
        """Adapters that queued requests need and no slot holds, in arrival order, without repeats."""
        names = [r.adapter for r in self.scheduler.waiting
                 if r.adapter is not None and r.adapter not in self.scheduler.adapter_slots]
        return list(dict.fromkeys(names))

    # ---- convenience -----------------------------------------------------------------------

    def generate(self, prompts: list[str | list[int]], adapters: list[str | None] | None = None,
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts to completion (their adapters must be loaded); results in prompt order."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(adapters) != len(prompts) or len(params) != len(prompts):
            raise invalid_argument("adapters", "prompts, adapters and sampling must have the same length")
        missing = [a for a in adapters if a is not None and a not in self.scheduler.adapter_slots]
        if missing:
            raise invalid_argument("adapters", f"adapter {missing[0]!r} is not loaded in a slot")
        for prompt, p in zip(prompts, params, strict=True):  # all checked before any is queued
            self._prompt_token_ids(prompt)
            (p or SamplingParams()).validate(self.spec.vocab_size)
        requests = [self._requests[self.add_request(prompt, p, adapter)]
                    for prompt, adapter, p in zip(prompts, adapters, params, strict=True)]
        while any(r.status is not RequestStatus.FINISHED for r in requests):
            if not self.step() and not self.last_step_ran:
                raise RuntimeError("no request can run: are their adapters still loaded?")
        return [Completion(r.request_id, tuple(r.prompt_token_ids), tuple(r.output_token_ids), r.text,
                           r.finish_reason, r.adapter) for r in requests]
