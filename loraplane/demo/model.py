"""The demo's base model: a small random Llama and a byte-level BPE tokenizer, made locally and cached.

Nothing is downloaded: the tokenizer is trained on a built-in corpus that holds the demo's
prompts and answers (so they take few tokens), and the weights are random. The directory name
carries a hash of everything that shapes the files, so a changed recipe never reuses a stale model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from loraplane.demo.recipes import PERSONAS

RECIPE_VERSION = 2
EOS = "<eos>"
# Everyday English besides the answers, so prompts people try next still split into words, not bytes.
_FILLER = (
    "Hello there! How are you today? Tell me a story about the sea. What is your name? "
    "Please answer the question. Write a short poem. Show me the data. The quick brown fox jumps "
    "over the lazy dog. One base model can serve many small adapters at the same time. "
)


@dataclass(frozen=True)
class ModelRecipe:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # the BPE target; the model gets the size the trainer actually reached
    max_position_embeddings: int = 256
    seed: int = 0

    def digest(self) -> str:
        blob = json.dumps({"recipe": asdict(self), "version": RECIPE_VERSION, "corpus": corpus()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# The full demo; the small one keeps the test suite fast while still training real adapters.
FULL = ModelRecipe(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                   intermediate_size=512, vocab_size=512)
SMALL = ModelRecipe(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, vocab_size=400)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loraplane" / "demo"


def corpus() -> list[str]:
    texts = [_FILLER]
    for persona in PERSONAS:
        texts.extend(persona.prompts)
        texts.append(persona.answer)
    return texts


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The full byte alphabet (256 tokens) keeps every string encodable, whatever people type.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def _build(recipe: ModelRecipe, out_dir: Path) -> None:
    import torch
    import transformers

    tokenizer = _train_tokenizer(recipe.vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(recipe.seed)
    config = transformers.LlamaConfig(
        hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads, num_key_value_heads=recipe.num_key_value_heads,
        intermediate_size=recipe.intermediate_size, vocab_size=len(tokenizer),
        max_position_embeddings=recipe.max_position_embeddings, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=eos_id, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    # LoRA cannot touch lm_head, and with the usual std of 0.02 the logits it can reach stay
    # within a few units of each other: too flat to memorize anything. 1/sqrt(d) lets them spread.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, recipe.hidden_size ** -0.5)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_base_model(cache_dir: Path, recipe: ModelRecipe, log=None) -> Path:
    """The cached model directory for `recipe`, built first when missing."""
    path = Path(cache_dir) / f"base-{recipe.digest()}"
    if (path / "config.json").exists():
        if log:
            log(f"cached at {path}")
        return path
    if log:
        log(f"creating a {recipe.num_hidden_layers}-layer, {recipe.hidden_size}-wide Llama "
            f"and its tokenizer in {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place, so an interrupted run never leaves a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        _build(recipe, staging)
        publish(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def publish(staging: Path, path: Path) -> None:
    """Rename a finished directory into place; a concurrent run that got there first wins."""
    try:
        os.replace(staging, path)
    except OSError:
        if not path.is_dir():
            raise


@contextlib.contextmanager
def quiet_transformers():
    """No per-file progress bars from transformers: the demo reports its own progress."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
