"""Train the demo's real PEFT LoRA adapters on CPU, in seconds, and cache them.

Each adapter learns to continue its persona's prompts with one answer and <eos>. After training,
every answer token must be the greedy choice by a clear logit margin under teacher forcing: that
is exactly the condition for greedy decoding to reproduce the answer, and the margin absorbs the
small numeric differences between transformers and loraplane's engine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from loraplane.demo.model import load_tokenizer, publish
from loraplane.demo.recipes import Persona

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainRecipe:
    rank: int = 16
    alpha: float = 32.0
    # Adam at 3e-3 memorizes in ~20-40 steps on both model sizes; 1e-2 and above oscillates on the
    # 4-layer model. The extra steps widen the margin, they are cheap (10-20 ms each).
    lr: float = 3e-3
    steps: int = 200
    margin: float = 4.0  # logit gap each answer token must have over the runner-up
    seed: int = 1

    def digest(self, base_dir: Path, persona: Persona) -> str:
        blob = json.dumps({"recipe": asdict(self), "base": base_dir.name, "persona": asdict(persona),
                           "targets": TARGET_MODULES}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class TrainingFailed(RuntimeError):
    pass


def _batch(tokenizer, persona: Persona):
    """Every prompt followed by the answer and <eos>; loss only on the answer (-100 elsewhere)."""
    import torch

    answer = tokenizer(persona.answer).input_ids + [tokenizer.eos_token_id]
    rows = []
    for prompt in persona.prompts:
        ids = tokenizer(prompt).input_ids
        rows.append((ids + answer, [-100] * len(ids) + answer))
    width = max(len(ids) for ids, _ in rows)
    # Right padding: under the causal mask, pads after a row's end never reach its real positions.
    pad = tokenizer.eos_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return input_ids, labels


def _min_margin(logits, labels) -> float:
    """Smallest gap, over answer positions, between the target's logit and the best other one."""
    import torch

    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    picked = logits[mask]
    wanted = targets[mask]
    target_logit = picked.gather(1, wanted[:, None]).squeeze(1)
    others = picked.scatter(1, wanted[:, None], torch.finfo(picked.dtype).min)
    return float((target_logit - others.max(1).values).min())


def train_adapter(model_dir: Path, persona: Persona, recipe: TrainRecipe, out_dir: Path, log) -> tuple[int, float]:
    """Train and save one adapter to out_dir; returns (optimizer steps, final loss)."""
    import torch

    # One thread: on a small, busy CPU, OpenMP workers contend and a step got 15-30x slower
    # with two threads than with one (measured on a 2-core host).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model_dir, persona, recipe, out_dir, log)
    finally:
        torch.set_num_threads(threads)


def _train(model_dir: Path, persona: Persona, recipe: TrainRecipe, out_dir: Path, log) -> tuple[int, float]:
    import torch
    import transformers

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # only training needs it: a cached demo runs without
        raise TrainingFailed("training the demo adapters needs peft: pip install peft") from e

    tokenizer = load_tokenizer(model_dir)
    input_ids, labels = _batch(tokenizer, persona)
    torch.manual_seed(recipe.seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                        target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft calls a transformers API that warns of its own deprecation: noise for demo users.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    start = time.monotonic()
    for step in range(1, recipe.steps + 1):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == recipe.steps:
            log(f"training: step {step}/{recipe.steps}, loss {float(loss.detach()):.4f}", transient=True)
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    loss, margin = float(out.loss), _min_margin(out.logits, labels)
    if margin < recipe.margin:
        raise TrainingFailed(f"adapter {persona.name!r} did not memorize its answer in {recipe.steps} steps "
                             f"(loss {loss:.4f}, worst token margin {margin:.2f} < {recipe.margin}); "
                             "try more --steps")
    model.save_pretrained(out_dir, safe_serialization=True)
    log(f"trained in {time.monotonic() - start:.1f}s: {recipe.steps} steps, loss {loss:.4f}, "
        f"worst token margin {margin:.1f}")
    return recipe.steps, loss


def ensure_adapters(cache_dir: Path, model_dir: Path, personas, recipe: TrainRecipe, progress) -> dict[str, Path]:
    """Cached adapter directories by persona name, training the missing ones.

    `progress(name)` returns the log function for that adapter's lines.
    """
    root = Path(cache_dir) / f"adapters-{model_dir.name.removeprefix('base-')}"
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for persona in personas:
        path = root / f"{persona.name}-{recipe.digest(model_dir, persona)}"
        log = progress(persona.name)
        if (path / "adapter_model.safetensors").exists():
            log(f"cached at {path}")
        else:
            staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=root))
            try:
                train_adapter(model_dir, persona, recipe, staging, log)
                publish(staging, path)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
        paths[persona.name] = path
    return paths
