"""What a model is to doramesh: a spec plus a factory of seeded blocks.

A model is an ordered list of blocks; block ``i`` consumes block ``i - 1``'s output. That is the
only granularity the planner splits at, so a stage is always a contiguous block range, and a
factory must be able to build any such range on its own (the coordinator never builds a whole
7B model just to serve one stage's weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Static facts about a model that callers need before building anything.

    ``sample_shape`` is the default per-sample input shape (no batch dimension): ``(T,)`` token
    ids for token models, ``(C, H, W)`` for image models. ``max_seq_len`` bounds ``T`` for token
    models whose position embedding is a learned table.
    """

    name: str
    num_blocks: int
    sample_shape: tuple[int, ...]
    input_dtype: torch.dtype
    vocab_size: int | None = None
    max_seq_len: int | None = None


BlockBuilder = Callable[[int, int, int], list[nn.Module]]
SkeletonBuilder = Callable[[int, int], list[nn.Module]]


@dataclass(frozen=True, slots=True)
class ModelFactory:
    """A model the zoo can build: ``factory(seed, first, last) -> blocks first..last``.

    ``build`` must be deterministic per block: block ``i`` gets the same weights whatever range it
    is built in (derive its randomness from ``(seed, i)``, e.g. with
    ``doramesh.models.seeding.block_generator``).

    ``skeleton(first, last)`` is optional: it builds the same architecture without initialising
    it, and is called under ``torch.device("meta")``. With it, profiling and loading shipped
    weights cost no random-init time and no memory; without it they fall back to ``build``.
    """

    spec: ModelSpec
    build: BlockBuilder
    skeleton: SkeletonBuilder | None = None

    def __call__(self, seed: int, first: int, last: int) -> list[nn.Module]:
        return self.build(seed, first, last)
