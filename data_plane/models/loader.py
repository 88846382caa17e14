"""Build the model on the meta device, then fill it from safetensors (never pickle).

Handles single-file and sharded checkpoints (model.safetensors.index.json), stacks
q/k/v and gate/up into the packed projections, and ties lm_head to the embedding
when the config says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from data_plane.models.config import ModelArgs
from data_plane.models.llama import PACKED_MODULES, LlamaForCausalLM
from data_plane.models.rope import RotaryEmbedding

INDEX_FILE = "model.safetensors.index.json"
# Checkpoint projection -> (packed projection, position in the pack).
_PACK_OF = {m: (packed, i) for packed, mods in PACKED_MODULES.items() for i, m in enumerate(mods)}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" ({pickles[0]} is a pickle file and is never loaded)" if pickles else ""
        raise ValueError(f"no safetensors weights in {model_dir}{hint}")
    return files


def load_model(model_dir: str | Path, args: ModelArgs, dtype: torch.dtype, device: torch.device,
               max_positions: int) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    rope = RotaryEmbedding(args, max_positions, device)
    with torch.device("meta"):
        model = LlamaForCausalLM(args, rope)
    _materialize(model, dtype, device)
    model.tie_weights()
    params = dict(model.named_parameters())
    # Packed parameters are filled row block by row block: count rows to know they are complete.
    filled: dict[str, int] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                target = _target(name, args)
                if target is None:
                    continue
                param_name, rows = target
                if param_name not in params:
                    raise ValueError(f"checkpoint tensor {name} has no place in the model ({param_name})")
                param = params[param_name]
                tensor = f.get_tensor(name)
                if tensor.shape != param[rows].shape:
                    raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(param[rows].shape)}")
                with torch.no_grad():
                    param[rows].copy_(tensor)
                filled[param_name] = filled.get(param_name, 0) + tensor.shape[0]
    missing = [n for n, p in params.items() if filled.get(n, 0) != p.shape[0]]
    if missing:
        raise ValueError(f"checkpoint lacks weights for {', '.join(missing[:5])}")
    return model.eval().requires_grad_(False)


def _materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            empty = torch.empty(param.shape, dtype=dtype, device=device)
            setattr(module, name, nn.Parameter(empty, requires_grad=False))


def _target(name: str, args: ModelArgs) -> tuple[str, slice] | None:
    """Checkpoint name -> (model parameter, its rows holding the tensor); None to skip the tensor."""
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    if name == "lm_head.weight" and args.tie_word_embeddings:
        return None  # some tied checkpoints store the copy anyway
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _PACK_OF and parts[-2] not in PACKED_MODULES:
        packed, index = _PACK_OF[parts[-2]]
        sizes = [args.spec.module_dims(m)[1] for m in PACKED_MODULES[packed]]
        start = sum(sizes[:index])
        return ".".join(parts[:-2] + [packed, parts[-1]]), slice(start, start + sizes[index])
    return name, slice(None)
