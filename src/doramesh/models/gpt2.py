"""GPT-2 small (124M) and medium (355M) shapes, split as embedding, transformer blocks, head.

Input: int64 token ids ``[B, T]`` with ``T <= 1024``; output of the last block: logits
``[B, T, 50257]``. No KV cache: every forward processes the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from doramesh.models.seeding import BlockInit, init_standard_layers, seeded_factory
from doramesh.models.spec import ModelFactory, ModelSpec
from doramesh.models.transformer import PreNormBlock

GPT2_VOCAB = 50257
GPT2_CONTEXT = 1024
GPT2_LN_EPS = 1e-5


@dataclass(frozen=True, slots=True)
class GPT2Config:
    dim: int
    layers: int
    heads: int
    vocab: int = GPT2_VOCAB
    context: int = GPT2_CONTEXT


class TokenPositionEmbedding(nn.Module):
    """Block 0: token embedding plus learned absolute position embedding."""

    def __init__(self, vocab: int, context: int, dim: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[-1], device=ids.device)
        out: torch.Tensor = self.wte(ids) + self.wpe(positions)
        return out


class LMHead(nn.Module):
    """Final block: ln_f then the vocabulary projection.

    The projection is deliberately NOT tied to ``wte`` (GPT-2 ties them): tying would make the
    first and last stage share one tensor, which pipeline stages on different devices cannot do,
    so every stage owns its weights. It costs ``vocab * dim`` extra parameters (38.6M for small).
    """

    def __init__(self, dim: int, vocab: int, eps: float) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(dim, eps=eps)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lm_head(self.ln_f(x))
        return out


def gpt2(name: str, cfg: GPT2Config) -> ModelFactory:
    num_blocks = cfg.layers + 2

    def make_block(i: int) -> nn.Module:
        if i == 0:
            return TokenPositionEmbedding(cfg.vocab, cfg.context, cfg.dim)
        if i == num_blocks - 1:
            return LMHead(cfg.dim, cfg.vocab, GPT2_LN_EPS)
        return PreNormBlock(
            cfg.dim, cfg.heads, 4 * cfg.dim, eps=GPT2_LN_EPS, causal=True, gelu="tanh"
        )

    def init_block(i: int, block: nn.Module, init: BlockInit) -> None:
        # GPT-2's init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * layers).
        init_standard_layers(
            block, init, linear_std=0.02, residual_std=0.02 / math.sqrt(2 * cfg.layers)
        )

    spec = ModelSpec(
        name=name,
        num_blocks=num_blocks,
        sample_shape=(32,),
        input_dtype=torch.int64,
        vocab_size=cfg.vocab,
        max_seq_len=cfg.context,
    )
    return seeded_factory(spec, make_block, init_block)


def gpt2_small() -> ModelFactory:
    return gpt2("gpt2-small", GPT2Config(dim=768, layers=12, heads=12))


def gpt2_medium() -> ModelFactory:
    return gpt2("gpt2-medium", GPT2Config(dim=1024, layers=24, heads=16))
