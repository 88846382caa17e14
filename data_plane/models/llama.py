"""Llama-family decoder (Llama 2/3, Mistral, Qwen2), plain torch, over a flat batch of tokens.

The batch is packed: every projection sees [T, hidden] for the T new tokens of all sequences,
so prefill and decode share one code path up to attention. Projections are packed (qkv,
gate_up) to cut matmul launches; LoRA is not known here: data_plane.lora.layers wraps the
projections named in `PACKED_MODULES` after the model is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from data_plane.models.attention import AttentionContext, paged_attention
from data_plane.models.config import ModelArgs
from data_plane.models.rope import RotaryEmbedding, apply_rope

# Packed projection -> the checkpoint projections stacked in it, in order (rows of the weight).
PACKED_MODULES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as the HF reference does.
        # (F.rms_norm computes x * rsqrt(mean(x^2) + eps) in one kernel: the same fp32 values.)
        h = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        s = args.spec
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.split = (q_out + kv_out, kv_out)  # qk | v columns of the packed projection
        self.qkv_proj = nn.Linear(s.hidden_size, q_out + 2 * kv_out, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_out, s.hidden_size, bias=args.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split(self.split, dim=-1)
        # q and k heads side by side take one rotation: half the elementwise calls of a decode step.
        qk = apply_rope(qk.view(t, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        return self.o_proj(paged_attention(self.layer, q, k, v, ctx))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden, inter = args.spec.hidden_size, args.spec.intermediate_size
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=args.mlp_bias)
        self.down_proj = nn.Linear(inter, hidden, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.spec.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.spec.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, ctx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        s = args.spec
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], ctx) -> hidden [T, hidden]; logits only where asked."""

    def __init__(self, args: ModelArgs, rope: RotaryEmbedding):
        super().__init__()
        self.args = args
        self.rope = rope
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.spec.hidden_size, args.spec.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope.lookup(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] (the rows to sample from) -> fp32 logits [B, vocab]."""
        return self.lm_head(self.model.norm(hidden)).float()
