"""Layer coarsening: merge adjacent layers into a few blocks so big models stay tractable.

The partitioner's mixed-integer program grows with the number of places a model can be cut, and
the dynamic program's work grows with its square. A 200-layer model does not need 199 candidate
cuts to be planned well: the plan is found over ``K`` blocks of adjacent layers, then its stage
boundaries are refined on the real layers (``refine_boundaries``), which recovers most of what
the coarse grid lost.

What coarsening keeps exact, and what it loses (``Coarsening`` reports it):

- FLOPs and parameter bytes of a block-aligned stage are sums, so they are exact; the activation
  crossing a block-aligned cut is the real layer's. A plan found on blocks is priced exactly by
  ``cost.predict`` on the original table.
- Only ``K - 1`` of the ``N - 1`` cut positions remain. Moving each boundary of the fine optimum
  to the nearest kept cut changes a stage's compute by at most one block, so the loss in the
  bottleneck (or in any stage time) is at most ``max_block_gflops`` divided by the speed of the
  device that runs it. ``max_block_gflops_fraction`` reports that block's share of the model.
- ``coarse_table`` (the dynamic program's input) can only over-estimate a stage's memory, never
  under-estimate it, so a plan it accepts fits on the real layers.

Blocks balance FLOPs and parameter bytes (so no block is much slower, or bigger, than the model's
average share) and prefer to end where the activation is small, where a real planner would cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from doramesh.types import LayerInfo, LayerTable, StagePlan, Workload

from . import cost

#: Weight of a cut's activation size (relative to the largest one) against the block balance
#: term, whose value is about 1 per block when blocks are even.
CUT_ACTIVATION_WEIGHT = 0.25


@dataclass(frozen=True, slots=True)
class Coarsening:
    """Blocks of adjacent layers: ``blocks[b] = (first layer, last layer)``, in order."""

    blocks: tuple[tuple[int, int], ...]
    n_layers: int
    max_block_gflops_fraction: float
    """The largest block's share of the model's forward FLOPs (0 for a zero-FLOP model)."""

    @property
    def exact(self) -> bool:
        """Whether every layer is its own block (nothing was merged)."""
        return len(self.blocks) == self.n_layers

    @property
    def kept_cuts(self) -> int:
        return len(self.blocks) - 1

    def layer_range(self, first_block: int, last_block: int) -> tuple[int, int]:
        return self.blocks[first_block][0], self.blocks[last_block][1]

    def expand(self, stages: Sequence[StagePlan]) -> tuple[StagePlan, ...]:
        """Stages over block indices -> the same stages over layer indices."""
        return tuple(
            StagePlan(self.blocks[s.first][0], self.blocks[s.last][1], s.devices) for s in stages
        )

    def contract(self, stages: Sequence[StagePlan]) -> tuple[StagePlan, ...] | None:
        """Stages over layer indices -> block indices, or None when a boundary is not a block's."""
        first_of = {first: b for b, (first, _) in enumerate(self.blocks)}
        last_of = {last: b for b, (_, last) in enumerate(self.blocks)}
        out: list[StagePlan] = []
        for s in stages:
            if s.first not in first_of or s.last not in last_of:
                return None
            out.append(StagePlan(first_of[s.first], last_of[s.last], s.devices))
        return tuple(out)

    def describe(self) -> str:
        if self.exact:
            return f"{self.n_layers} layers, not coarsened"
        return (
            f"{self.n_layers} layers in {len(self.blocks)} blocks ({self.kept_cuts} of "
            f"{self.n_layers - 1} cuts kept; largest block {self.max_block_gflops_fraction:.1%} "
            "of the FLOPs)"
        )


def identity(n_layers: int, table: LayerTable | None = None) -> Coarsening:
    blocks = tuple((i, i) for i in range(n_layers))
    fraction = 0.0
    if table is not None:
        total = sum(layer.gflops for layer in table.layers)
        if total > 0:
            fraction = max(layer.gflops for layer in table.layers) / total
    return Coarsening(blocks, n_layers, fraction)


def coarsen(table: LayerTable, max_blocks: int, *, keep_cuts: Sequence[int] = ()) -> Coarsening:
    """At most ``max_blocks`` blocks of adjacent layers, balanced, cut at small activations.

    A dynamic program over (blocks used, last layer) minimises the sum over blocks of
    ``max(flops / flops_target, params / params_target) ** 2`` plus, per cut,
    ``CUT_ACTIVATION_WEIGHT * activation / largest activation``: squares spread the work evenly,
    and the cut term moves boundaries towards small activations when balance allows it.
    ``O(max_blocks * N^2)``, vectorised over the start layer.

    ``keep_cuts`` (layer indices a cut must follow) become block boundaries whatever they cost,
    so that a plan cut there (say, the dynamic program's) is a plan over the blocks too.
    """
    n = len(table.layers)
    if max_blocks < 1:
        raise ValueError("max_blocks must be at least 1")
    forced = sorted({c for c in keep_cuts if 0 <= c < n - 1})
    if n <= max_blocks or n <= len(forced) + 1:
        return identity(n, table)
    k_blocks = max(max_blocks, len(forced) + 1)
    flops = np.array([layer.gflops for layer in table.layers], dtype=np.float64)
    params = np.array([float(layer.param_bytes) for layer in table.layers], dtype=np.float64)
    acts = np.array([float(layer.activation_bytes) for layer in table.layers], dtype=np.float64)
    fp = np.concatenate([[0.0], np.cumsum(flops)])
    pp = np.concatenate([[0.0], np.cumsum(params)])
    f_target = fp[-1] / k_blocks if fp[-1] > 0 else 1.0
    p_target = pp[-1] / k_blocks if pp[-1] > 0 else 1.0
    a_max = float(acts[:-1].max()) if n > 1 and acts[:-1].max() > 0 else 1.0
    cut_cost = CUT_ACTIVATION_WEIGHT * acts / a_max  # a cut after layer j

    idx = np.arange(n)
    upper = idx[:, None] <= idx[None, :]  # [i, j]: a block may run from layer i to layer j
    balance = np.maximum(
        (fp[None, 1:] - fp[:-1, None]) / f_target, (pp[None, 1:] - pp[:-1, None]) / p_target
    )
    balance = np.where(upper, balance**2, math.inf)  # [i, j]: cost of the block i..j
    for c in forced:
        balance[: c + 1, c + 1 :] = math.inf  # no block may straddle a kept cut

    # best[k, j]: least cost of covering layers 0..j with k+1 blocks, the last ending at j.
    best = np.full((k_blocks, n), math.inf)
    parent = np.full((k_blocks, n), -1, dtype=np.int64)
    best[0] = balance[0]
    for k in range(1, k_blocks):
        # A block starting at i >= 1 follows a best (k-1)-block cover ending at i - 1.
        prev = np.full(n, math.inf)
        prev[1:] = best[k - 1, :-1] + cut_cost[:-1]
        total = prev[:, None] + balance  # [i, j]
        parent[k] = np.argmin(total, axis=0)
        best[k] = total[parent[k], idx]
    k = k_blocks - 1
    blocks: list[tuple[int, int]] = []
    end = n - 1
    while k >= 0:
        start = 0 if k == 0 else int(parent[k, end])
        blocks.append((start, end))
        end = start - 1
        k -= 1
    blocks.reverse()
    fraction = 0.0
    if fp[-1] > 0:
        fraction = max(fp[b + 1] - fp[a] for a, b in blocks) / fp[-1]
    return Coarsening(tuple(blocks), n, float(fraction))


def coarse_table(table: LayerTable, coarsening: Coarsening, workload: Workload) -> LayerTable:
    """A layer table with one entry per block, for the single-device dynamic program.

    FLOPs (forward and backward), parameters and the cut activations are exact. Memory is never
    under-estimated for a block-aligned stage run with ``workload.batch`` samples:

    - inference: a block's peak (largest input + output + workspace of its layers) becomes its
      workspace beyond its own input and output; exact unless the block's outer input and output
      alone exceed every inner layer's peak, where it over-estimates;
    - training: a stage keeps every layer's input for the backward pass, and inputs inside a
      block are no block's input, so they are folded into the block's parameter bytes (divided
      by the training state factor, rounded up): exact up to that rounding.
    """
    if coarsening.exact:
        return table
    samples = workload.batch
    inflight = cost.inflight_microbatches(workload.kind)
    layers: list[LayerInfo] = []
    for first, last in coarsening.blocks:
        members = table.layers[first : last + 1]
        block_in = cost.input_bytes_of(table, first)
        act = members[-1].activation_bytes
        params = sum(layer.param_bytes for layer in members)
        if workload.kind == "training":
            inner = sum(layer.activation_bytes for layer in members[:-1]) * samples * inflight
            params += math.ceil(inner / cost.TRAINING_STATE_FACTOR)
            workspace = max(layer.workspace_bytes for layer in members)
        else:
            peak = max(
                cost.input_bytes_of(table, i) + layer.activation_bytes + layer.workspace_bytes
                for i, layer in zip(range(first, last + 1), members, strict=True)
            )
            workspace = max(0, peak - block_in - act)
        layers.append(
            LayerInfo(
                name=f"{members[0].name}..{members[-1].name}"
                if len(members) > 1
                else members[0].name,
                gflops=sum(layer.gflops for layer in members),
                param_bytes=params,
                activation_bytes=act,
                workspace_bytes=workspace,
                gflops_bwd=sum(layer.backward_gflops for layer in members),
            )
        )
    return LayerTable(f"{table.model}[{len(layers)} blocks]", tuple(layers), table.input_bytes)


__all__ = ["Coarsening", "coarse_table", "coarsen", "identity"]
