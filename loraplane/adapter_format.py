"""PEFT LoRA adapters in, loraplane artifacts out.

`normalize_peft_dir` reads a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors), checks it against a base ModelSpec and returns a
NormalizedAdapter: one tensor pair per (layer, module), scaling folded into B,
one dtype. `NormalizedAdapter.to_bytes()` is the artifact whose sha256 is the
adapter's version. Every refusal is a LoraplaneError with a precise reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loraplane.errors import LoraplaneError
from loraplane.model_spec import LORA_MODULES, ModelSpec
from loraplane.v1 import errors_pb2 as R

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
ARTIFACT_FORMAT = "loraplane.lora.v1"
MAX_HEADER_BYTES = 64 << 20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# ASCII only: a Unicode digit ("layers.\u0663") is no layer index, and the length cap keeps a
# 5,000-digit index from reaching int().
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.([0-9]{1,6})\.(self_attn|mlp)\."
    r"(\w+?)\.lora_(A|B)(?:\.[\w-]+)?\.weight$", re.ASCII
)
# Tensor-name fragments of PEFT features loraplane does not serve, and the name to report.
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora)",
    "lora_embedding_A": "LoRA on embeddings",
    "lora_embedding_B": "LoRA on embeddings",
    "modules_to_save": "modules_to_save",
    "lm_head": "LoRA on lm_head",
    "embed_tokens": "LoRA on embed_tokens",
    ".bias": "LoRA bias",
}


def _fail(reason: int, message: str, **metadata: str) -> LoraplaneError:
    return LoraplaneError(reason, message, metadata)


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of PEFT's adapter_config.json that change the math."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ()
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def scaling(self, module_path: str, rank: int) -> float:
        alpha = float(_pattern_value(self.alpha_pattern, module_path, self.lora_alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.r))


def _pattern_value(patterns: dict, module_path: str, default):
    # PEFT matches rank/alpha pattern keys as regexes against the end of the module path.
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_path):
            return value
    return default


_SAFE_PATTERN = re.compile(r"\^?(?:[A-Za-z0-9_-]|\\\.|\.\*?|\|)*\$?")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def parse_adapter_config(raw: bytes | str) -> AdapterConfig:
    """Parse and check adapter_config.json, refusing features that would change the math silently."""
    bad = R.ERROR_REASON_INVALID_ADAPTER_CONFIG
    try:
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(bad, f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise _fail(bad, f"{CONFIG_FILE} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(R.ERROR_REASON_UNSUPPORTED_FEATURE, f"peft_type {cfg.get('peft_type')!r} is not LORA",
                    feature="peft_type")
    unsupported = {
        "use_dora": "DoRA (use_dora)", "modules_to_save": "modules_to_save",
        "layer_replication": "layer_replication", "use_qalora": "QA-LoRA", "lora_bias": "lora_bias",
        "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
        "alora_invocation_tokens": "activated LoRA", "megatron_config": "megatron_config",
    }
    for key, feature in unsupported.items():
        if cfg.get(key):
            raise _fail(R.ERROR_REASON_UNSUPPORTED_FEATURE, f"{feature} is not supported", feature=key)
    if cfg.get("bias", "none") != "none":
        raise _fail(R.ERROR_REASON_UNSUPPORTED_FEATURE, "trained biases (bias != 'none') are not supported",
                    feature="bias")
    if cfg.get("fan_in_fan_out"):
        raise _fail(R.ERROR_REASON_UNSUPPORTED_FEATURE,
                    "fan_in_fan_out is for Conv1D models; Llama-family projections are Linear",
                    feature="fan_in_fan_out")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise _fail(bad, f"r must be a positive integer, got {r!r}", field="r")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise _fail(bad, f"lora_alpha must be a number, got {alpha!r}", field="lora_alpha")
    targets = cfg.get("target_modules") or ()
    if isinstance(targets, list):
        if not all(isinstance(t, str) for t in targets):
            raise _fail(bad, "target_modules must be strings", field="target_modules")
        targets = tuple(targets)
    elif not isinstance(targets, str):
        raise _fail(bad, "target_modules must be a list or a string", field="target_modules")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    elif isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers):
        layers = tuple(layers)
    elif layers is not None:
        raise _fail(bad, "layers_to_transform must be an int or a list of ints", field="layers_to_transform")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key) or {}
        good = _positive_int if key == "rank_pattern" else _positive_number
        if not isinstance(value, dict) or not all(good(v) for v in value.values()):
            raise _fail(bad, f"{key} must map module patterns to positive {'integers' if good is _positive_int else 'numbers'}",
                        field=key)
        for pattern in value:
            # Keys are regexes matched against module paths: a crafted one ("(.*)*x") backtracks for
            # hours. Module names and simple patterns only, which match in linear-ish time.
            if len(pattern) > 256 or not _SAFE_PATTERN.fullmatch(pattern) or pattern.count("*") > 2:
                raise _fail(bad, f"{key} key {pattern[:80]!r} must be a module name or a simple pattern "
                            "(letters, digits, '_', '-', '.', '\\.', '.*' at most twice, '|', '^', '$')", field=key)
        patterns[key] = value
    return AdapterConfig(r=r, lora_alpha=float(alpha), use_rslora=bool(cfg.get("use_rslora")),
                         target_modules=targets, layers_to_transform=layers, **patterns)


def check_safetensors_header(data: bytes) -> dict:
    """Validate the safetensors framing before any tensor is touched; return the header."""
    corrupt = R.ERROR_REASON_CORRUPT_WEIGHTS
    if len(data) < 8:
        raise _fail(corrupt, "safetensors file is truncated (no header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise _fail(corrupt, "safetensors header length is out of bounds (truncated or corrupted file)")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise _fail(corrupt, "safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _fail(corrupt, "safetensors header is not a JSON object")
    end = 0
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise _fail(corrupt, f"tensor {name!r} has a malformed header entry") from None
        # JSON lets each of these be anything: types first, so no arithmetic meets a list or a string.
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in (start, stop, *shape)):
            raise _fail(corrupt, f"tensor {name!r} has a malformed header entry")
        if dtype not in _ST_DTYPES:
            raise _fail(R.ERROR_REASON_UNSUPPORTED_FEATURE, f"tensor {name!r} has dtype {dtype[:20]}; "
                        "only F32, F16 and BF16 adapters are served", feature="dtype")
        numel = math.prod(shape) if all(d >= 0 for d in shape) else -1
        if numel < 0 or stop - start != numel * _ST_DTYPES[dtype].itemsize or start < 0:
            raise _fail(corrupt, f"tensor {name!r} byte range does not match its shape and dtype")
        ranges.append((start, stop))
        end = max(end, stop)
    # safetensors lays tensors back to back from offset 0; overlaps or gaps mean a crafted file.
    position = 0
    for start, stop in sorted(ranges):
        if start != position:
            raise _fail(corrupt, "safetensors tensor byte ranges overlap or leave gaps")
        position = stop
    if 8 + n + end != len(data):
        raise _fail(corrupt, f"safetensors data is {len(data) - 8 - n} bytes, header says {end} (truncated?)")
    return header


@dataclass
class NormalizedAdapter:
    """One adapter, canonical: `layers.{i}.{module}.lora_A` [r, in] and `.lora_B` [out, r] (scaled)."""

    tensors: dict[str, torch.Tensor]
    rank: int
    target_modules: tuple[str, ...]
    dtype: str
    # The PEFT config it came from (alpha, rsLoRA) for the registry record; not part of the artifact.
    source_config: AdapterConfig | None = None

    def pairs(self):
        """Yield (layer, module, A [r, in], B [out, r])."""
        for key in sorted(k for k in self.tensors if k.endswith(".lora_A")):
            _, layer, module, _ = key.split(".")
            yield int(layer), module, self.tensors[key], self.tensors[key[:-1] + "B"]

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        # One metadata key holding sorted JSON: safetensors writes a multi-key metadata map in
        # hash order, which would make the same adapter hash to a different version each time.
        meta = json.dumps({"format": ARTIFACT_FORMAT, "rank": self.rank, "target_modules": list(self.target_modules),
                           "dtype": self.dtype}, sort_keys=True, separators=(",", ":"))
        return st_save({k: v.contiguous() for k, v in self.tensors.items()}, metadata={"loraplane": meta})

    @classmethod
    def from_bytes(cls, data: bytes) -> NormalizedAdapter:
        header = check_safetensors_header(data)
        try:
            meta = json.loads((header.get("__metadata__") or {}).get("loraplane", "{}"))
            if meta.get("format") != ARTIFACT_FORMAT:
                raise ValueError(meta.get("format"))
            return cls(tensors=st_load(data), rank=int(meta["rank"]),
                       target_modules=tuple(meta["target_modules"]), dtype=meta["dtype"])
        except (ValueError, KeyError, TypeError, AttributeError, SafetensorError):
            raise _fail(R.ERROR_REASON_CORRUPT_WEIGHTS, f"not a {ARTIFACT_FORMAT} artifact") from None


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def normalize_peft_dir(path: Path, spec: ModelSpec, max_rank: int, max_bytes: int | None = None,
                       dtype: str = "auto") -> NormalizedAdapter:
    """Read, check and normalize the PEFT adapter in `path` for the base model `spec`."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_FILES if (path / p).exists()]
        if pickles:
            raise _fail(R.ERROR_REASON_UNSAFE_FORMAT,
                        f"{pickles[0]} is a pickle file and is never loaded; convert the adapter to "
                        f"{WEIGHTS_FILE} (PEFT: save_pretrained(..., safe_serialization=True))")
        raise _fail(R.ERROR_REASON_INVALID_ADAPTER_CONFIG, f"no {WEIGHTS_FILE} in the adapter")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise _fail(R.ERROR_REASON_INVALID_ADAPTER_CONFIG, f"no {CONFIG_FILE} in the adapter")
    config = parse_adapter_config(config_path.read_bytes())
    size = weights.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise _fail(R.ERROR_REASON_ADAPTER_TOO_LARGE,
                    f"adapter weights are {size} bytes, over the {max_bytes}-byte limit")
    adapter = normalize_peft(config, weights.read_bytes(), spec, max_rank, dtype)
    adapter.source_config = config
    return adapter


def normalize_peft(config: AdapterConfig, data: bytes, spec: ModelSpec, max_rank: int,
                   dtype: str = "auto") -> NormalizedAdapter:
    if isinstance(config.target_modules, tuple):
        unknown = [m for m in config.target_modules if m not in LORA_MODULES]
        if unknown:
            raise _fail(R.ERROR_REASON_ADAPTER_INCOMPATIBLE,
                        f"target module(s) {', '.join(unknown)} do not exist in {spec.architecture}; "
                        f"LoRA can target {', '.join(LORA_MODULES)}", module=unknown[0])
    header = check_safetensors_header(data)
    # (layer, module) -> {"A" | "B": (tensor name, shape)}: exactly the tensors checked here are the
    # ones normalized below.
    found: dict[tuple[int, str], dict[str, tuple[str, list[int]]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        for fragment, feature in _UNSUPPORTED_KEYS.items():
            if fragment in name:
                raise _fail(R.ERROR_REASON_UNSUPPORTED_FEATURE, f"{feature} is not supported (tensor {name})",
                            feature=feature)
        m = _KEY.match(name)
        if not m:
            raise _fail(R.ERROR_REASON_ADAPTER_INCOMPATIBLE,
                        f"tensor {name} is not a LoRA weight of a {spec.architecture} projection")
        layer, group, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if module not in LORA_MODULES:
            raise _fail(R.ERROR_REASON_ADAPTER_INCOMPATIBLE,
                        f"tensor {name} targets {module}, which {spec.architecture} does not have", module=module)
        if group != _group(module):
            raise _fail(R.ERROR_REASON_ADAPTER_INCOMPATIBLE,
                        f"tensor {name}: {module} is under {_group(module)}, not {group}", module=module)
        if layer >= spec.num_layers:
            raise _fail(R.ERROR_REASON_ADAPTER_INCOMPATIBLE,
                        f"tensor {name} is for layer {layer}; the base model has {spec.num_layers} layers")
        pair = found.setdefault((layer, module), {})
        if which in pair:
            # Two names for one weight (PEFT's "lora_A.weight" and "lora_A.<adapter>.weight"): which
            # one is meant is a guess, and a guess would let an unchecked tensor through.
            raise _fail(R.ERROR_REASON_CORRUPT_WEIGHTS,
                        f"two tensors for layer {layer} {module} lora_{which}: {pair[which][0]} and {name}",
                        module=module)
        pair[which] = (name, info["shape"])
    if not found:
        raise _fail(R.ERROR_REASON_CORRUPT_WEIGHTS, "the adapter holds no LoRA tensors")
    rank = 0
    for (layer, module), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise _fail(R.ERROR_REASON_CORRUPT_WEIGHTS, f"layer {layer} {module} lacks lora_{'AB'[('A' in ab)]}")
        (_, a_shape), (_, b_shape) = ab["A"], ab["B"]
        d_in, d_out = spec.module_dims(module)
        r = a_shape[0] if len(a_shape) == 2 else -1
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != d_in or b_shape != [d_out, r]:
            raise _fail(R.ERROR_REASON_ADAPTER_INCOMPATIBLE,
                        f"layer {layer} {module}: lora_A {a_shape} / lora_B {b_shape} do not fit the base "
                        f"model (expected [r, {d_in}] and [{d_out}, r])", module=module)
        if r > max_rank:
            raise _fail(R.ERROR_REASON_RANK_TOO_LARGE, f"rank {r} ({module}) is above --max-lora-rank {max_rank}",
                        rank=str(r), max_rank=str(max_rank))
        if r != config.rank_for(_module_path(layer, module)):
            raise _fail(R.ERROR_REASON_INVALID_ADAPTER_CONFIG,
                        f"layer {layer} {module} has rank {r}, adapter_config.json says "
                        f"{config.rank_for(_module_path(layer, module))}")
        rank = max(rank, r)
    if config.layers_to_transform is not None:
        stray = sorted({layer for layer, _ in found} - set(config.layers_to_transform))
        if stray:
            raise _fail(R.ERROR_REASON_INVALID_ADAPTER_CONFIG,
                        f"weights for layer {stray[0]} outside layers_to_transform")
    try:
        raw = st_load(data)
    except SafetensorError as e:
        raise _fail(R.ERROR_REASON_CORRUPT_WEIGHTS, f"safetensors could not read the weights: {e}") from None
    source_dtypes = {t.dtype for t in raw.values()}
    if dtype == "auto":
        out_dtype = source_dtypes.pop() if len(source_dtypes) == 1 else torch.float32
    elif dtype in DTYPES:
        out_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"artifact dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    tensors = {}
    for (layer, module), pair in sorted(found.items()):
        a, b = raw[pair["A"][0]], raw[pair["B"][0]]
        # One reduction instead of an elementwise mask: NaN and Inf both survive a sum.
        if not (torch.isfinite(a.sum(dtype=torch.float32)) and torch.isfinite(b.sum(dtype=torch.float32))):
            raise _fail(R.ERROR_REASON_CORRUPT_WEIGHTS, f"layer {layer} {module} holds NaN or Inf")
        scale = config.scaling(_module_path(layer, module), a.shape[0])
        a_out = a.to(out_dtype).contiguous()
        b_out = (b.float() * scale).to(out_dtype).contiguous()
        # Finite before is not finite after: lora_alpha 1e30, or a cast to float16, can overflow.
        if not torch.isfinite(a_out.sum(dtype=torch.float64)):
            raise _fail(R.ERROR_REASON_CORRUPT_WEIGHTS, f"layer {layer} {module}: lora_A overflows {out_dtype}")
        if not torch.isfinite(b_out.sum(dtype=torch.float64)):
            raise _fail(R.ERROR_REASON_INVALID_ADAPTER_CONFIG,
                        f"layer {layer} {module}: lora_B scaled by {scale:g} (lora_alpha / r) overflows {out_dtype}",
                        field="lora_alpha")
        tensors[f"layers.{layer}.{module}.lora_A"] = a_out
        tensors[f"layers.{layer}.{module}.lora_B"] = b_out
    modules = tuple(m for m in LORA_MODULES if any(mod == m for _, mod in found))
    return NormalizedAdapter(tensors=tensors, rank=rank, target_modules=modules,
                             dtype=str(out_dtype).removeprefix("torch."))


def _group(module: str) -> str:
    return "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def _module_path(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{_group(module)}.{module}"
