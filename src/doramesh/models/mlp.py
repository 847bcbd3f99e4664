"""``mlp-tiny``: a few Linear+ReLU blocks, small enough for every test and the quickest demo."""

from __future__ import annotations

import math

import torch
from torch import nn

from doramesh.models.seeding import BlockInit, seeded_factory
from doramesh.models.spec import ModelFactory, ModelSpec

MLP_IN = 64
MLP_HIDDEN = 128
MLP_OUT = 10
MLP_HIDDEN_BLOCKS = 3


class DenseReLU(nn.Module):
    """One hidden layer: Linear then ReLU."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act(self.fc(x))
        return out


class Classifier(nn.Module):
    """The last block: logits, no activation."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out


def _make_block(i: int) -> nn.Module:
    if i == MLP_HIDDEN_BLOCKS:
        return Classifier(MLP_HIDDEN, MLP_OUT)
    return DenseReLU(MLP_IN if i == 0 else MLP_HIDDEN, MLP_HIDDEN)


def _init_block(i: int, block: nn.Module, init: BlockInit) -> None:
    fc = block.fc
    assert isinstance(fc, nn.Linear)
    # He init keeps activations at unit scale through the ReLUs; a small bias exercises the
    # bias path in weight round trips.
    init.fan_in_std(fc.weight, gain=math.sqrt(2.0))
    init.uniform_std(fc.bias, 0.01)


def mlp_tiny() -> ModelFactory:
    spec = ModelSpec(
        name="mlp-tiny",
        num_blocks=MLP_HIDDEN_BLOCKS + 1,
        sample_shape=(MLP_IN,),
        input_dtype=torch.float32,
    )
    return seeded_factory(spec, _make_block, _init_block)
