"""ViT-Base/16 (86M): patch embedding, 12 encoder blocks, classification head.

Trained for 224x224 (a 14x14 patch grid). Smaller or larger images (any multiple of 16) work
with the same weights: the position embedding is resampled bicubically to the actual grid, as
timm does for ``dynamic_img_size``. Weights never depend on the input size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from doramesh.models.seeding import BlockInit, init_standard_layers, seeded_factory
from doramesh.models.spec import ModelFactory, ModelSpec
from doramesh.models.transformer import PreNormBlock

VIT_IMAGE = 224
VIT_PATCH = 16
VIT_DIM = 768
VIT_LAYERS = 12
VIT_HEADS = 12
VIT_MLP = 3072
VIT_LN_EPS = 1e-6  # the original (JAX) ViT and timm; HF's port uses 1e-12
NUM_CLASSES = 1000


class PatchEmbedding(nn.Module):
    """Block 0: 16x16 patches to tokens, prepend the class token, add position embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.grid = VIT_IMAGE // VIT_PATCH
        self.proj = nn.Conv2d(3, VIT_DIM, VIT_PATCH, stride=VIT_PATCH)
        self.cls_token = nn.Parameter(torch.empty(1, 1, VIT_DIM))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + self.grid * self.grid, VIT_DIM))

    def _pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        if (rows, cols) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, self.grid, self.grid, VIT_DIM).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, rows * cols, VIT_DIM)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.proj(x)
        rows, cols = patches.shape[-2:]
        tokens = patches.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self._pos_embed(rows, cols)


class ClassifierHead(nn.Module):
    """Final block: LayerNorm, take the class token, project to 1000 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(VIT_DIM, eps=VIT_LN_EPS)
        self.fc = nn.Linear(VIT_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.norm(x)[:, 0])
        return out


def _make_block(i: int) -> nn.Module:
    if i == 0:
        return PatchEmbedding()
    if i == VIT_LAYERS + 1:
        return ClassifierHead()
    return PreNormBlock(VIT_DIM, VIT_HEADS, VIT_MLP, eps=VIT_LN_EPS, causal=False, gelu="none")


def _init_block(i: int, block: nn.Module, init: BlockInit) -> None:
    if isinstance(block, PatchEmbedding):
        # LeCun-style for the patch projection (fan_in = 3*16*16); tokens at std 0.02 as in timm.
        init.fan_in_std(block.proj.weight)
        assert block.proj.bias is not None
        init.constant(block.proj.bias, 0.0)
        init.uniform_std(block.cls_token, 0.02)
        init.uniform_std(block.pos_embed, 0.02)
        return
    residual_std = 0.02 / math.sqrt(2 * VIT_LAYERS)
    init_standard_layers(block, init, linear_std=0.02, residual_std=residual_std)


def vit_base() -> ModelFactory:
    spec = ModelSpec(
        name="vit-base",
        num_blocks=VIT_LAYERS + 2,
        sample_shape=(3, VIT_IMAGE, VIT_IMAGE),
        input_dtype=torch.float32,
    )
    return seeded_factory(spec, _make_block, _init_block)
