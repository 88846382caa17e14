"""Shared builders for the engine and model tests: tiny models, PEFT adapters, a test tokenizer,
and the HF transformers + PEFT oracle. Artifacts are cached per test session (they are
deterministic in their arguments), so each is built once however many tests use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_plane.engine.config import EngineConfig
from data_plane.engine.engine import Engine
from loraplane.adapter_format import NormalizedAdapter, normalize_peft_dir
from loraplane.model_spec import ModelSpec
from tests.factories import make_peft_adapter, make_tiny_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
TOKENIZER_VOCAB = 320
_CORPUS = ["hello world, the quick brown fox jumps over the lazy dog. ",
           "héllo wörld, ça va? naïve café. ", "世界 你好 世界 🙂🙂 ", "stop here. STOP there. END. "]


class Artifacts:
    """Builds models and adapters under one directory, each once per distinct argument set."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}

    def _key(self, kind: str, **kwargs) -> str:
        return kind + "-" + json.dumps(kwargs, sort_keys=True, default=str)

    def model(self, arch: str = "llama", tokenizer: bool = False, **overrides) -> Path:
        key = self._key("model", arch=arch, tokenizer=tokenizer, **overrides)
        if key not in self._built:
            path = self.root / f"model{len(self._built)}"
            if tokenizer:
                overrides.setdefault("vocab_size", TOKENIZER_VOCAB)
            make_tiny_model(path, arch, **overrides)
            if tokenizer:
                save_test_tokenizer(path, overrides["vocab_size"])
            self._built[key] = path
        return self._built[key]

    def adapter(self, model_dir: Path, r: int = 8, alpha: float = 16, target_modules=("q_proj", "v_proj"),
                seed: int = 1, **lora_kwargs) -> Path:
        key = self._key("adapter", model=model_dir, r=r, alpha=alpha, t=list(target_modules), seed=seed,
                        **lora_kwargs)
        if key not in self._built:
            path = self.root / f"adapter{len(self._built)}"
            make_peft_adapter(model_dir, path, r=r, alpha=alpha, target_modules=target_modules, seed=seed,
                              **lora_kwargs)
            self._built[key] = path
        return self._built[key]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("engine-artifacts"))


def save_test_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with exactly vocab_size tokens (id 0 = <eos>), saved as a
    PreTrainedTokenizerFast so AutoTokenizer loads it from model_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 50, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"test tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(model_dir)


def normalized(model_dir: Path, adapter_dir: Path, max_rank: int = 64) -> NormalizedAdapter:
    return normalize_peft_dir(adapter_dir, ModelSpec.from_pretrained(str(model_dir)), max_rank)


def make_engine(model_dir: Path, adapters: dict[str, Path] | None = None, **config) -> Engine:
    """An engine with each adapter loaded into a slot, in order."""
    config.setdefault("max_model_len", 128)
    config.setdefault("max_lora_rank", 64)
    config.setdefault("max_loras", max(1, len(adapters or {})))
    engine = Engine(EngineConfig(model=str(model_dir), **config))
    for slot, (name, path) in enumerate((adapters or {}).items()):
        engine.load_adapter(name, slot, normalized(model_dir, path, engine.config.max_lora_rank))
    return engine


def record_logits(engine: Engine) -> dict[str, list[torch.Tensor]]:
    """Wrap the engine's sampler so every logits row it sees is kept, per request id."""
    seen: dict[str, list[torch.Tensor]] = {}
    sampler = engine.runner.sampler

    def recording(logits, requests):
        for row, request in zip(logits, requests, strict=True):
            seen.setdefault(request.request_id, []).append(row.clone())
        return sampler(logits, requests)

    engine.runner.sampler = recording
    return seen


class HFOracle:
    """HF transformers + PEFT with several adapters loaded: the reference for the engine."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path] | None = None, dtype=torch.float32):
        import transformers
        from peft import PeftModel

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        model.generation_config.eos_token_id = None  # compare fixed-length runs (ignore_eos)
        for i, (name, path) in enumerate((adapters or {}).items()):
            if i == 0:
                model = PeftModel.from_pretrained(model, path, adapter_name=name).eval()
            else:
                model.load_adapter(path, adapter_name=name)
        self.model = model
        self.has_adapters = bool(adapters)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], adapters: list[str | None], max_new_tokens: int):
        """Greedy, one request at a time (no padding): (token ids, [steps, vocab] logits) per request."""
        results = []
        for prompt, adapter in zip(prompts, adapters, strict=True):
            ids = torch.tensor([prompt])
            kwargs = {"adapter_names": [adapter or "__base__"]} if self.has_adapters else {}
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, output_logits=True, return_dict_in_generate=True,
                                      **kwargs)
            results.append((out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()))
        return results

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], adapters: list[str | None], max_new_tokens: int):
        """Greedy, all requests in one mixed-adapter batch (prompts of equal length)."""
        ids = torch.tensor(prompts)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, adapter_names=[a or "__base__" for a in adapters])
        return out[:, ids.shape[1]:].tolist()


def random_prompts(lengths: list[int], vocab: int = 256, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny models step faster on one thread, and far faster when other processes share the CPU
    (OpenMP workers spin-waiting for a busy core); restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
