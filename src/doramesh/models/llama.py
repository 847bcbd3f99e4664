"""Llama-architecture decoders; ``llama-1b`` has Llama-3.2-1B's public shapes.

Llama-3.2-1B: hidden 2048, 16 layers, 32 query heads and 8 key/value heads (grouped-query
attention, head dim 64), SwiGLU MLP with 8192 hidden, vocab 128256, RMSNorm eps 1e-5, RoPE
theta 500000 with the "llama3" frequency scaling (factor 32, low/high frequency factors 1 and 4,
original context 8192). Blocks: token embedding, one block per decoder layer, final norm plus
lm_head. The released model ties lm_head to the embedding; here they are separate tensors so
the first and last stage are independent (that adds 263M parameters: 1.50B instead of 1.24B).

``LlamaConfig`` and ``llama`` are public so other sizes (e.g. a 7B config to profile on the
meta device) can be registered without copying the architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from doramesh.models.seeding import BlockInit, init_standard_layers, seeded_factory
from doramesh.models.spec import ModelFactory, ModelSpec


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3's long-context frequency scaling (HF ``rope_type: llama3``)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    dim: int = 2048
    layers: int = 16
    heads: int = 32
    kv_heads: int = 8
    hidden: int = 8192
    vocab: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    max_seq_len: int = 131072

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


LLAMA_3_2_1B = LlamaConfig()


def rope_inverse_frequencies(cfg: LlamaConfig) -> list[float]:
    """RoPE inverse frequencies (with Llama 3 scaling when configured), as plain floats.

    Plain floats rather than a buffer: a buffer would be uninitialised after ``to_empty`` and
    would travel in every stage's weights for nothing.
    """
    dim = cfg.head_dim
    freqs = [1.0 / cfg.rope_theta ** (i / dim) for i in range(0, dim, 2)]
    s = cfg.rope_scaling
    if s is None:
        return freqs
    low_wavelen = s.original_context / s.low_freq_factor
    high_wavelen = s.original_context / s.high_freq_factor
    scaled = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            scaled.append(f)
        elif wavelen > low_wavelen:
            scaled.append(f / s.factor)
        else:
            smooth = (s.original_context / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            scaled.append((1 - smooth) * f / s.factor + smooth * f)
    return scaled


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary position embedding (HF's half-split layout)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.inv_freq = rope_inverse_frequencies(cfg)
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)

    def _rope(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float32, device=device)
        angles = torch.outer(torch.arange(t, dtype=torch.float32, device=device), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self._rope(t, x.device)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads
        )
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
        return out


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class TokenEmbedding(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.embed_tokens(ids)
        return out


class NormHead(nn.Module):
    """Final block: RMSNorm then an lm_head that is NOT tied to the embedding (see module doc)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.norm(x))
        return out


def llama(name: str, cfg: LlamaConfig, *, sample_len: int = 32) -> ModelFactory:
    """A Llama-architecture factory for ``cfg`` (blocks: embedding, layers, norm + head)."""
    num_blocks = cfg.layers + 2

    def make_block(i: int) -> nn.Module:
        if i == 0:
            return TokenEmbedding(cfg)
        if i == num_blocks - 1:
            return NormHead(cfg)
        return DecoderLayer(cfg)

    def init_block(i: int, block: nn.Module, init: BlockInit) -> None:
        init_standard_layers(block, init, linear_std=0.02)  # HF initializer_range

    spec = ModelSpec(
        name=name,
        num_blocks=num_blocks,
        sample_shape=(sample_len,),
        input_dtype=torch.int64,
        vocab_size=cfg.vocab,
        max_seq_len=cfg.max_seq_len,
    )
    return seeded_factory(spec, make_block, init_block)


def llama_1b() -> ModelFactory:
    return llama("llama-1b", LLAMA_3_2_1B)
