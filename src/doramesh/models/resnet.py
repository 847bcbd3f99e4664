"""ResNet-18 and ResNet-50 (torchvision's v1.5 layout), one residual block per zoo block.

Blocks: the stem (conv 7x7, BN, ReLU, max pool), every BasicBlock/Bottleneck, and the head
(global average pool, flatten, fc to 1000 classes). The global pool makes any input of at least
32x32 work, so tests can run 3x64x64 images with the same weights as 3x224x224.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from doramesh.models.seeding import BlockInit, seeded_factory
from doramesh.models.spec import ModelFactory, ModelSpec

BN_EPS = 1e-5
NUM_CLASSES = 1000
STAGE_PLANES = (64, 128, 256, 512)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv(3, 64, 7, stride=2)
        self.bn = nn.BatchNorm2d(64, eps=BN_EPS)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.pool(self.relu(self.bn(self.conv(x))))
        return out


class Downsample(nn.Module):
    """The shortcut's 1x1 projection when shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = _conv(c_in, c_out, 1, stride=stride)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn(self.conv(x))
        return out


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, planes, 3, stride=stride)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.relu = nn.ReLU()
        out = planes * self.expansion
        self.downsample = Downsample(c_in, out, stride) if stride != 1 or c_in != out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        out: torch.Tensor = self.relu(y + shortcut)
        return out


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as in torchvision's v1.5), 1x1 expand."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.conv2 = _conv(planes, planes, 3, stride=stride)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, eps=BN_EPS)
        self.relu = nn.ReLU()
        out = planes * self.expansion
        self.downsample = Downsample(c_in, out, stride) if stride != 1 or c_in != out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        out: torch.Tensor = self.relu(y + shortcut)
        return out


class Head(nn.Module):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(torch.flatten(self.pool(x), 1))
        return out


ResidualBlock = type[BasicBlock] | type[Bottleneck]


def _block_args(kind: ResidualBlock, depths: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(in channels, planes, stride) of every residual block, in order."""
    args = []
    c_in = 64
    for stage, (planes, depth) in enumerate(zip(STAGE_PLANES, depths, strict=True)):
        for j in range(depth):
            stride = 2 if stage > 0 and j == 0 else 1
            args.append((c_in, planes, stride))
            c_in = planes * kind.expansion
    return args


def _init_bn(bn: nn.BatchNorm2d, init: BlockInit, *, residual_end: bool) -> None:
    """BN in eval mode with plausible, non-trivial statistics.

    Without training data there are no real running statistics; small random ones exercise the
    whole BN path (and its buffers in weight round trips). The BN that ends a residual branch
    gets a small gamma, as a trained ResNet (and torchvision's ``zero_init_residual``) has: it
    keeps activations from doubling at every residual add, so deep stacks stay at unit scale.
    """
    assert bn.weight is not None and bn.bias is not None
    assert bn.running_mean is not None and bn.running_var is not None
    assert bn.num_batches_tracked is not None
    if residual_end:
        init.uniform(bn.weight, 0.1, 0.3)
    else:
        init.uniform(bn.weight, 0.8, 1.2)
    init.uniform_std(bn.bias, 0.05)
    init.uniform_std(bn.running_mean, 0.05)
    init.uniform(bn.running_var, 0.8, 1.2)
    init.constant(bn.num_batches_tracked, 0)


def _init_resnet_block(block: nn.Module, init: BlockInit) -> None:
    residual_bn = None
    if isinstance(block, BasicBlock):
        residual_bn = block.bn2
    elif isinstance(block, Bottleneck):
        residual_bn = block.bn3
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            init.fan_out_std(module.weight, gain=math.sqrt(2.0))
        elif isinstance(module, nn.BatchNorm2d):
            _init_bn(module, init, residual_end=module is residual_bn)
        elif isinstance(module, nn.Linear):
            init.fan_in_std(module.weight)
            init.constant(module.bias, 0.0)


def _resnet(name: str, kind: ResidualBlock, depths: tuple[int, ...]) -> ModelFactory:
    args = _block_args(kind, depths)
    num_blocks = len(args) + 2

    def make_block(i: int) -> nn.Module:
        if i == 0:
            return Stem()
        if i == num_blocks - 1:
            return Head(STAGE_PLANES[-1] * kind.expansion)
        return kind(*args[i - 1])

    def init_block(i: int, block: nn.Module, init: BlockInit) -> None:
        _init_resnet_block(block, init)

    spec = ModelSpec(
        name=name, num_blocks=num_blocks, sample_shape=(3, 224, 224), input_dtype=torch.float32
    )
    return seeded_factory(spec, make_block, init_block)


def resnet18() -> ModelFactory:
    return _resnet("resnet18", BasicBlock, (2, 2, 2, 2))


def resnet50() -> ModelFactory:
    return _resnet("resnet50", Bottleneck, (3, 4, 6, 3))
