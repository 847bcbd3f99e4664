"""Per-block seeded initialisation, so any block range can be built on its own.

Each block gets its own ``torch.Generator`` seeded from ``(model seed, block index)``; nothing
random is shared between blocks, so building blocks ``[first..last]`` gives bit-identical
weights to the same blocks of the full model. Blocks are first created on the meta device (no
allocation, no default init) and then materialised and filled exactly once, which is what makes
building large models quick: the default ``reset_parameters`` of every layer would otherwise
run and then be thrown away.

Random fills are uniform with the standard deviation of the reference init (e.g. ``std=0.02``
becomes ``U(-0.02*sqrt(3), 0.02*sqrt(3))``): on CPU ``uniform_`` is about 3x faster than
``normal_`` and is plain float arithmetic on the generator's bits, so it does not depend on the
vector instruction set the way a vectorised Box-Muller does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

from doramesh.errors import Internal
from doramesh.models.spec import ModelFactory, ModelSpec


def block_seed(seed: int, index: int) -> int:
    """A 63-bit seed for block ``index`` of a model built with ``seed``.

    Hashing (rather than e.g. ``seed + index``) keeps nearby seeds of different blocks and
    models from producing overlapping streams.
    """
    digest = hashlib.sha256(f"doramesh-block:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def block_generator(seed: int, index: int) -> torch.Generator:
    """A fresh CPU generator for block ``index``; always CPU so weights do not depend on device."""
    return torch.Generator(device="cpu").manual_seed(block_seed(seed, index))


class BlockInit:
    """Fills a materialised block's tensors from one generator, and checks that it filled all.

    ``to_empty`` leaves memory uninitialised; a tensor an init function forgets would silently
    make weights non-deterministic, so ``finish`` refuses a block with any tensor left unfilled.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._done: set[int] = set()

    def _mark(self, t: torch.Tensor) -> torch.Tensor:
        self._done.add(id(t))
        return t

    @torch.no_grad()
    def uniform_std(self, t: torch.Tensor, std: float) -> None:
        """Zero-mean uniform noise with standard deviation ``std``."""
        bound = std * math.sqrt(3.0)
        self._mark(t).uniform_(-bound, bound, generator=self.generator)

    @torch.no_grad()
    def uniform(self, t: torch.Tensor, low: float, high: float) -> None:
        self._mark(t).uniform_(low, high, generator=self.generator)

    @torch.no_grad()
    def constant(self, t: torch.Tensor, value: float) -> None:
        self._mark(t).fill_(value)

    def fan_in_std(self, t: torch.Tensor, gain: float = 1.0) -> None:
        """He/LeCun style init: std = gain / sqrt(fan_in) (fan_in = all dims but the first)."""
        fan_in = t[0].numel() if t.dim() > 1 else t.numel()
        self.uniform_std(t, gain / math.sqrt(fan_in))

    def fan_out_std(self, t: torch.Tensor, gain: float = 1.0) -> None:
        """torchvision's ResNet conv init: std = gain / sqrt(out_channels * kernel area)."""
        fan_out = t.shape[0] * (t[0, 0].numel() if t.dim() > 2 else 1)
        self.uniform_std(t, gain / math.sqrt(fan_out))

    def finish(self, block: nn.Module) -> None:
        missing = [
            name
            for name, t in [*block.named_parameters(), *block.named_buffers()]
            if id(t) not in self._done
        ]
        if missing:
            raise Internal(f"{type(block).__name__}: init left tensors unfilled: {missing}")


class ResidualOut(nn.Linear):
    """A projection that writes into the residual stream; its init is scaled down with depth.

    A marker type rather than a name convention, so the init cannot silently miss a renamed
    layer. It is a plain ``nn.Linear`` otherwise (same state_dict keys and maths).
    """


def seeded_factory(
    spec: ModelSpec,
    make_block: Callable[[int], nn.Module],
    init_block: Callable[[int, nn.Module, BlockInit], None],
) -> ModelFactory:
    """A factory from an architecture function and a per-block init function.

    ``make_block(i)`` creates block ``i`` on whatever the current default device is (the zoo
    calls it under ``torch.device("meta")``); ``init_block(i, block, init)`` fills every
    parameter and buffer of the materialised CPU block through ``init``.
    """

    def skeleton(first: int, last: int) -> list[nn.Module]:
        return [make_block(i) for i in range(first, last + 1)]

    def build(seed: int, first: int, last: int) -> list[nn.Module]:
        blocks = []
        for i in range(first, last + 1):
            with torch.device("meta"):
                block = make_block(i)
            block = block.to_empty(device="cpu")
            init = BlockInit(block_generator(seed, i))
            init_block(i, block, init)
            init.finish(block)
            blocks.append(block)
        return blocks

    return ModelFactory(spec=spec, build=build, skeleton=skeleton)


def init_standard_layers(
    block: nn.Module,
    init: BlockInit,
    *,
    linear_std: float | None = 0.02,
    residual_std: float | None = None,
) -> None:
    """Init the standard layers of ``block`` in module order (the order is part of the seed).

    Linear: ``U`` with std ``linear_std`` (or He init when ``linear_std`` is None), bias 0;
    a ``ResidualOut`` uses ``residual_std`` when given (GPT-2's ``0.02 / sqrt(2 * n_layer)``).
    Embedding: std 0.02. LayerNorm and RMSNorm: weight 1, bias 0. Custom parameters are the
    block's own business.
    """
    for module in block.modules():
        if isinstance(module, nn.Linear):
            if isinstance(module, ResidualOut) and residual_std is not None:
                init.uniform_std(module.weight, residual_std)
            elif linear_std is None:
                init.fan_in_std(module.weight, gain=math.sqrt(2.0))
            else:
                init.uniform_std(module.weight, linear_std)
            if module.bias is not None:
                init.constant(module.bias, 0.0)
        elif isinstance(module, nn.Embedding):
            init.uniform_std(module.weight, 0.02)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                init.constant(module.weight, 1.0)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                init.constant(bias, 0.0)
