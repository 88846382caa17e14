"""The base model's shape, read from its config.json: what adapters are checked against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The projections LoRA may target, in the order packed layers use them.
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTN_MODULES + MLP_MODULES

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions of a Llama-family decoder, enough to check any LoRA tensor's shape."""

    name: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size", "vocab_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"model spec {field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        dims = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        try:
            return dims[module]
        except KeyError:
            raise ValueError(f"unknown module {module!r}; expected one of {', '.join(LORA_MODULES)}") from None

    @classmethod
    def from_config(cls, config: dict, name: str = "") -> ModelSpec:
        archs = config.get("architectures") or []
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch or '(none)'}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(
                name=name or config.get("_name_or_path", "") or arch,
                architecture=arch,
                hidden_size=hidden,
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks {e.args[0]!r}") from None

    @classmethod
    def from_pretrained(cls, path_or_id: str, revision: str | None = None, *, endpoint: str | None = None,
                        token: str | None = None) -> ModelSpec:
        """From a local model directory, or a Hub id via huggingface_hub (config.json only), at
        `revision` (branch, tag or commit; the default branch when None) from `endpoint` (a mirror).
        ValueError, saying which, when neither gives a config.json."""
        path = Path(path_or_id).expanduser()
        if revision and (path.is_dir() or path.is_absolute() or path_or_id.startswith((".", "~"))):
            raise ValueError(f"a revision ({revision}) applies to Hub ids, not to the directory {path_or_id}")
        if path.is_dir():
            config_path = path / "config.json"
            if not config_path.is_file():
                raise ValueError(f"{path_or_id} has no config.json: it is not a Hugging Face model directory")
        elif path.is_absolute() or path_or_id.startswith((".", "~")) or path.exists():
            # A mistyped path is not a Hub id; huggingface_hub would say only that the id is malformed.
            raise ValueError(f"model directory {path_or_id} does not exist")
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

            try:
                config_path = Path(hf_hub_download(path_or_id, "config.json", revision=revision,
                                                   endpoint=endpoint, token=token))
            except (EntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as e:
                raise ValueError(f"cannot get config.json of {path_or_id!r} from the Hugging Face Hub "
                                 f"(is it a local directory, or is the Hub unreachable?): {e}") from None
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {config_path}: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} is not a JSON object")
        return cls.from_config(config, name=path_or_id)
