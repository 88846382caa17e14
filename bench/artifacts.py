"""What the suite serves, written to disk fast: a random Llama, random LoRA adapters, a merged model.

Weights are written straight to safetensors from seeded generators, never through
transformers' initialisers or peft.get_peft_model: 1,000 rank-16 adapters of the bench model
(4.8 MB each) then take seconds, not minutes. Adapters exist in two forms from the same tensors:
the normalized artifact (what the control plane serves and the data plane caches) for all of
them, and a PEFT directory (lora_alpha = r, so the scale is 1 and both forms are the same math)
for the few that HF + PEFT, the merged peer and the gRPC service need.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.engine_cpu import MODEL, MODULES
from loraplane.adapter_format import NormalizedAdapter, digest
from loraplane.model_spec import ModelSpec

# Llama-3-8B shapes for --gpu (random weights: throughput does not depend on their values).
GPU_MODEL = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
BENCH_MODEL = dict(MODEL)
_GROUP = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in MODULES}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_model(out: Path, dims: dict, seed: int = 0, dtype: str = "float32", shard_bytes: int = 4 << 30) -> Path:
    """A random LlamaForCausalLM checkpoint (config.json + sharded safetensors) that HF and the engine both load."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**dims, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = dtype
    config.save_pretrained(out)
    h, inter, vocab = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    head = h // dims["num_attention_heads"]
    kv = dims["num_key_value_heads"] * head
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (vocab, h)})
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = DTYPES[dtype]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        t = t.to(torch_dtype)
        if size and size + t.numel() * t.element_size() > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    _save_shards(out, shards)
    return out


def _save_shards(out: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def adapter_tensors(spec: ModelSpec, rank: int, seed: int, dtype: str = "float32"):
    """{(layer, module): (A [r, in], B [out, r])}, on all 7 projections of every layer."""
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in range(spec.num_layers):
        for module in MODULES:
            d_in, d_out = spec.module_dims(module)
            # Big enough that an adapter visibly changes greedy outputs (the merged peer's check).
            a = (torch.randn(rank, d_in, generator=gen) / d_in ** 0.5).to(DTYPES[dtype])
            b = (torch.randn(d_out, rank, generator=gen) * 0.05).to(DTYPES[dtype])
            pairs[(layer, module)] = (a, b)
    return pairs


def normalized(pairs, rank: int, dtype: str = "float32") -> NormalizedAdapter:
    tensors = {}
    for (layer, module), (a, b) in pairs.items():
        tensors[f"layers.{layer}.{module}.lora_A"] = a
        tensors[f"layers.{layer}.{module}.lora_B"] = b
    return NormalizedAdapter(tensors=tensors, rank=rank, target_modules=tuple(MODULES), dtype=dtype)


def write_peft_dir(out: Path, pairs, rank: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, module), (a, b) in pairs.items():
        base = f"base_model.model.model.layers.{layer}.{_GROUP[module]}.{module}"
        tensors[f"{base}.lora_A.weight"] = a.contiguous()
        tensors[f"{base}.lora_B.weight"] = b.contiguous()
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(MODULES),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}))
    return out


class AdapterStore:
    """The origin of the in-process path: normalized artifacts a0..aN, standing in for the control plane.

    Eager (the default) writes every artifact up front, so a fetch is a file read, like a LAN
    transfer. Lazy is for 8B shapes, where 1,000 adapters would not fit on disk: it keeps one
    generated artifact per rank in memory and makes a{i} from it by rotating the tensor bytes by
    i elements, which is as fast as a copy (generating an 8B-shaped adapter with randn takes
    seconds, which would be timed as the control plane's) and gives every adapter its own bytes
    and digest.
    """

    def __init__(self, root: Path, spec: ModelSpec, dtype: str = "float32", lazy: bool = False):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.dtype = dtype
        self.lazy = lazy
        self.ranks: dict[str, int] = {}
        self._versions: dict[str, str] = {}
        self._templates: dict[int, bytes] = {}  # lazy: rank -> the artifact a{i} is rotated from

    @staticmethod
    def seed_of(name: str) -> int:
        return 1000 + int(name[1:])

    def ensure(self, ranks: list[int]) -> None:
        """Adapters a0..a{n-1} with these ranks; ones already there at the same rank are kept."""
        for i, rank in enumerate(ranks):
            name = f"a{i}"
            if self.ranks.get(name) == rank:
                continue
            self.ranks[name] = rank
            self._versions.pop(name, None)
            if not self.lazy:
                data = self._generate(name)
                self._path(name).write_bytes(data)
                self._versions[name] = digest(data)

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def _generate(self, name: str) -> bytes:
        rank = self.ranks[name]
        if not self.lazy:
            return normalized(adapter_tensors(self.spec, rank, self.seed_of(name), self.dtype), rank,
                              self.dtype).to_bytes()
        if rank not in self._templates:
            self._templates[rank] = normalized(adapter_tensors(self.spec, rank, self.seed_of("a0"), self.dtype),
                                               rank, self.dtype).to_bytes()
        return rotated(self._templates[rank], int(name[1:]) * DTYPES[self.dtype].itemsize)

    def version(self, name: str) -> str:
        if name not in self._versions:
            self._versions[name] = digest(self._generate(name))
        return self._versions[name]

    def read(self, name: str) -> bytes:
        return self._generate(name) if self.lazy else self._path(name).read_bytes()

    def load(self, name: str) -> NormalizedAdapter:
        return NormalizedAdapter.from_bytes(self.read(name))

    def peft_dir(self, name: str, out_root: Path) -> Path:
        """The same adapter as a PEFT directory (for HF + PEFT, the merged model, the control plane)."""
        out = out_root / name
        if not (out / "adapter_model.safetensors").is_file():
            pairs = {(layer, module): (a, b) for layer, module, a, b in self.load(name).pairs()}
            write_peft_dir(out, pairs, self.ranks[name])
        return out


def rotated(artifact: bytes, shift: int) -> bytes:
    """The safetensors file with its tensor bytes (all of one dtype) rotated by `shift` bytes: the
    header, so names, shapes and offsets, is unchanged."""
    start = 8 + int.from_bytes(artifact[:8], "little")
    data = memoryview(artifact)[start:]
    shift %= len(data)
    return b"".join((artifact[:start], data[len(data) - shift:], data[:len(data) - shift]))


def merge_into(model_dir: Path, adapter: NormalizedAdapter, out: Path) -> Path:
    """W' = W + B A for every adapted projection (scaling is already folded into B), as a model dir."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.suffix == ".json":
            (out / f.name).write_bytes(f.read_bytes())
    deltas = {}
    for layer, module, a, b in adapter.pairs():
        deltas[f"model.layers.{layer}.{_GROUP[module]}.{module}.weight"] = (b.float() @ a.float())
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        for name, delta in deltas.items():
            if name in tensors:
                tensors[name] = (tensors[name].float() + delta).to(tensors[name].dtype)
        save_file(tensors, out / shard.name, metadata={"format": "pt"})
    return out
