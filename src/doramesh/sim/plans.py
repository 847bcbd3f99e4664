"""Plans as the simulator runs them, and the checks that make a plan set infeasible up front.

Structural errors (layers not covered in order, unknown devices, no replica with a positive share)
are bugs in whoever built the plan and raise ``ValueError``. Physical impossibilities (a device
without the memory for its stages, a stage boundary or an all-reduce over a pair with no link, a
device with no compute) make the run infeasible: every request is lost.

The memory model is the simulator's own reading of "params + activations in flight":

- inference: a replica holds its stages' parameters plus, for each of ``INFERENCE_INFLIGHT``
  microbatches (one computing, one arriving), the largest input + output + workspace of any of its
  layers for its samples;
- training (GPipe): four times the parameters (weights, gradients, two Adam moments) plus every
  layer input of the stage and the stage output for *all* of the step's microbatches (GPipe keeps
  them until the backward pass), plus the largest workspace for one microbatch.

Every live plan is deployed at once (the adapter switches between them per microbatch), so a
device's needs add up over all live plans' stages on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from doramesh.scenario_types import Scenario
from doramesh.sim.network import pace_of
from doramesh.types import MIB, LayerTable, Plan, WorkloadKind

#: Inference microbatches a replica holds at once: one computing, one arriving.
INFERENCE_INFLIGHT = 2
#: Training state per parameter byte: weights, gradients, Adam's two moments.
TRAINING_STATE_FACTOR = 4
#: The agent's token bucket never bursts less than this (``doramesh.agent.runtime`` floors
#: ``burst_kb`` at 64), so neither does the simulated one.
MIN_BURST_BYTES = 64e3


def split_samples(samples: int, shares: Sequence[float]) -> tuple[int, ...]:
    """Whole samples per replica, proportional to ``shares`` (largest remainder).

    Every replica with a positive share gets at least one sample when there are enough samples
    (taken from the replica with the most); with fewer samples than replicas the largest shares
    get one each (earlier replicas first on ties).
    """
    total = sum(s for s in shares if s > 0)
    if samples <= 0 or total <= 0:
        return tuple(0 for _ in shares)
    positive = [i for i, s in enumerate(shares) if s > 0]
    if samples <= len(positive):
        chosen = sorted(positive, key=lambda i: -shares[i])[:samples]
        return tuple(1 if i in chosen else 0 for i in range(len(shares)))
    exact = [samples * s / total if s > 0 else 0.0 for s in shares]
    counts = [math.floor(e) for e in exact]
    order = sorted(positive, key=lambda i: counts[i] - exact[i])
    for i in order[: samples - sum(counts)]:
        counts[i] += 1
    for i in positive:
        if counts[i] == 0:
            donor = max(positive, key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] = 1
    return tuple(counts)


@dataclass(frozen=True, slots=True)
class StageModel:
    """One stage with its replicas of positive share, and its per-sample costs."""

    devices: tuple[str, ...]
    shares: tuple[float, ...]
    fwd_gflop: float
    bwd_gflop: float
    out_bytes: float  # activation leaving the stage, per sample
    param_bytes: int
    memory_per_sample: int  # see the module docstring; per sample held
    workspace_bytes: int


@dataclass(slots=True, eq=False)
class PlanModel:
    index: int
    plan_id: str
    share: float
    stages: tuple[StageModel, ...]
    #: Samples in each microbatch of one request (inference) or one step (training).
    microbatches: tuple[int, ...]
    #: Token buckets (bytes/s, bytes) of the plan's paced flows.
    pace: dict[tuple[str, str], tuple[float, float]]
    nodes: frozenset[str]
    #: The power mode each device runs in for this plan (devices in their top mode left out).
    modes: dict[str, str]
    #: Saturating runs: work units (inference: microbatches; training: steps) kept in flight.
    window: int
    units_per_job: int
    inflight: int = 0
    _splits: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)

    def counts(self, stage: int, samples: int) -> tuple[int, ...]:
        key = (stage, samples)
        got = self._splits.get(key)
        if got is None:
            got = split_samples(samples, self.stages[stage].shares)
            self._splits[key] = got
        return got


def _input_bytes(table: LayerTable, index: int) -> int:
    return table.input_bytes if index == 0 else table.layers[index - 1].activation_bytes


def microbatch_sizes(batch: int, microbatch: int) -> tuple[int, ...]:
    batch = max(1, batch)
    size = max(1, min(microbatch, batch))
    full, rest = divmod(batch, size)
    return (size,) * full + ((rest,) if rest else ())


def build(
    plan: Plan,
    index: int,
    share: float,
    scenario: Scenario,
    *,
    pacing: bool,
    window_per_stage: int,
) -> PlanModel:
    table = scenario.model
    kind = scenario.workload.kind
    nlayers = len(table.layers)
    known = {d.node_id for d in scenario.devices}
    where = f"plan {plan.plan_id!r}"
    if not plan.stages:
        raise ValueError(f"{where}: no stages")
    if plan.microbatch < 1:
        raise ValueError(f"{where}: microbatch must be >= 1, got {plan.microbatch}")
    mode_names = {str(d.node_id): {m.name for m in d.power_modes} for d in scenario.devices}
    modes: dict[str, str] = {}
    expected = 0
    stages: list[StageModel] = []
    for k, stage in enumerate(plan.stages):
        if stage.first != expected or stage.last < stage.first or stage.last >= nlayers:
            raise ValueError(
                f"{where}: stages[{k}] covers layers [{stage.first}, {stage.last}]; stages must "
                f"cover layers 0..{nlayers - 1} in order"
            )
        expected = stage.last + 1
        ids = [d.id for d in stage.devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: stages[{k}] lists a device twice")
        for d in stage.devices:
            if d.id not in known:
                raise ValueError(f"{where}: stages[{k}] uses unknown device {d.id!r}")
            if d.share < 0 or not math.isfinite(d.share):
                raise ValueError(f"{where}: stages[{k}] share of {d.id} is {d.share}")
        members = [d for d in stage.devices if d.share > 0]
        for d in members:
            if d.mode and d.mode not in mode_names[str(d.id)]:
                raise ValueError(f"{where}: stages[{k}]: {d.id} has no power mode {d.mode!r}")
            if modes.setdefault(str(d.id), d.mode) != d.mode:
                raise ValueError(f"{where}: {d.id} is in two power modes")
        if not members:
            raise ValueError(f"{where}: stages[{k}] has no device with a positive share")
        layers = table.layers[stage.first : stage.last + 1]
        if kind == "training":
            per_sample = sum(_input_bytes(table, i) for i in stage.layers)
            per_sample += layers[-1].activation_bytes
        else:
            per_sample = max(
                _input_bytes(table, i) + layer.activation_bytes + layer.workspace_bytes
                for i, layer in zip(stage.layers, layers, strict=True)
            )
        stages.append(
            StageModel(
                devices=tuple(str(d.id) for d in members),
                shares=tuple(d.share for d in members),
                fwd_gflop=sum(layer.gflops for layer in layers),
                bwd_gflop=sum(layer.backward_gflops for layer in layers),
                out_bytes=float(layers[-1].activation_bytes),
                param_bytes=sum(layer.param_bytes for layer in layers),
                memory_per_sample=per_sample,
                workspace_bytes=max(layer.workspace_bytes for layer in layers),
            )
        )
    if expected != nlayers:
        raise ValueError(f"{where}: stages cover layers 0..{expected - 1}, the model has {nlayers}")
    pace: dict[tuple[str, str], tuple[float, float]] = {}
    if pacing:
        for flow in plan.flows:
            if flow.rate_mbps > 0:
                pace[(str(flow.src), str(flow.dst))] = pace_of(
                    flow.rate_mbps, flow.burst_kb, min_burst_bytes=MIN_BURST_BYTES
                )
    sizes = microbatch_sizes(scenario.workload.batch, plan.microbatch)
    training = kind == "training"
    return PlanModel(
        index=index,
        plan_id=str(plan.plan_id),
        share=share,
        stages=tuple(stages),
        microbatches=sizes,
        pace=pace,
        nodes=frozenset(d for s in stages for d in s.devices),
        modes={node: mode for node, mode in modes.items() if mode},
        window=1 if training else window_per_stage * len(stages),
        units_per_job=1 if training else len(sizes),
    )


def infeasibility(plans: Sequence[PlanModel], scenario: Scenario) -> str:
    """Why the live plans cannot run as given, or "" when they can."""
    devices = {str(d.node_id): d for d in scenario.devices}
    network = scenario.network
    kind: WorkloadKind = scenario.workload.kind
    for plan in plans:
        for node in sorted(plan.nodes):
            if devices[node].gflops <= 0:
                return f"plan {plan.plan_id!r}: device {node} has no compute (gflops 0)"
        pairs: list[tuple[str, str]] = []
        for before, after in zip(plan.stages, plan.stages[1:], strict=False):
            pairs.extend((a, b) for a in before.devices for b in after.devices if a != b)
        if kind == "training":
            for stage in plan.stages:
                ring = stage.devices
                if len(ring) > 1:
                    pairs.extend(zip(ring, ring[1:] + ring[:1], strict=True))
        for a, b in pairs:
            bandwidth, _ = network.link(devices[a].node_id, devices[b].node_id)
            if not bandwidth > 0:
                what = "a link" if network.kind == "links" else "bandwidth on the medium"
                return f"plan {plan.plan_id!r}: no {what} between {a} and {b}"
    need = _memory_needs(plans, kind)
    for node, (bytes_needed, plan_id) in sorted(need.items()):
        have = devices[node].memory_bytes
        if bytes_needed > have:
            return (
                f"plan {plan_id!r}: device {node} needs {bytes_needed / MIB:.1f} MiB for the "
                f"stages of the live plans on it, has {have / MIB:.1f} MiB"
            )
    return ""


def _memory_needs(plans: Sequence[PlanModel], kind: WorkloadKind) -> Mapping[str, tuple[int, str]]:
    """Bytes each device needs, with the last plan that added to it (for the message)."""
    need: dict[str, tuple[int, str]] = {}
    for plan in plans:
        for k, stage in enumerate(plan.stages):
            per_replica = [plan.counts(k, n) for n in plan.microbatches]
            for j, node in enumerate(stage.devices):
                held = [counts[j] for counts in per_replica]
                if kind == "training":
                    bytes_needed = (
                        TRAINING_STATE_FACTOR * stage.param_bytes
                        + stage.memory_per_sample * sum(held)
                        + stage.workspace_bytes * max(held)
                    )
                else:
                    bytes_needed = (
                        stage.param_bytes + INFERENCE_INFLIGHT * stage.memory_per_sample * max(held)
                    )
                before, _ = need.get(node, (0, plan.plan_id))
                need[node] = (before + bytes_needed, plan.plan_id)
    return need
