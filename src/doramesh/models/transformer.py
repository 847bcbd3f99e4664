"""Pre-norm transformer encoder/decoder blocks shared by GPT-2 and ViT.

Both are the same block (LayerNorm, multi-head self-attention, LayerNorm, two-layer GELU MLP,
residuals around each); they differ in causality, the norm epsilon and the GELU variant.
Attention is ``scaled_dot_product_attention`` so CPU and GPU pick their fused kernels.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from doramesh.models.seeding import ResidualOut


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (GPT-2's ``c_attn`` layout)."""

    def __init__(self, dim: int, heads: int, *, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = ResidualOut(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return out


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, *, gelu: Literal["none", "tanh"]) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=gelu)
        self.proj = ResidualOut(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.proj(self.act(self.fc(x)))
        return out


class PreNormBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)): one zoo block."""

    def __init__(
        self,
        dim: int,
        heads: int,
        hidden: int,
        *,
        eps: float,
        causal: bool,
        gelu: Literal["none", "tanh"],
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads, causal=causal)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, hidden, gelu=gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out
