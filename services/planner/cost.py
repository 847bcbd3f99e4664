"""Analytical cost model of a pipeline plan: time, memory and energy per microbatch.

Pure arithmetic on the domain values (no gRPC, no torch, no I/O). The dynamic program in
``dp.py`` optimises over the same quantities in a vectorised form; ``predict`` here is the
single source of truth for the figures a plan reports, so whatever the search does, a plan's
``predicted`` comes from this module.

The model, per microbatch of ``workload.batch`` samples (a request is one microbatch):

- *compute*: a stage's time is ``sum(layer GFLOP) * samples / device GFLOP/s``; for a group of
  devices (data-parallel replicas inside a stage) each device computes its share of the samples
  and the stage takes as long as its slowest replica. Training counts forward plus backward FLOPs.
- *transfer*: between consecutive stages the last layer's activation (``activation_bytes *
  samples``) crosses the network: ``bytes * 8 / (bandwidth_mbps * 1e6)`` seconds on the wire,
  plus the path latency. Training sends the gradient back the same way, so a boundary costs
  twice. The coordinator's input transfer to stage 0 and the output back are *not* counted: they
  are the same for every plan on a fleet, depend on the coordinator's link, which the planner is
  not told, and would only shift every plan's latency by a constant.
- *latency*: one microbatch through the pipeline, ``sum(compute) + sum(transfer)``.
- *bottleneck*: the steady-state time between microbatches, ``max(max stage compute, network
  term)``. The network term counts wire time only, since path latency overlaps with other
  microbatches once the pipeline is full (activations stream over gRPC without stop-and-wait).
  On a shared medium (Wi-Fi) every transfer competes for one capacity, so the term is the *sum*
  of all wire times per microbatch; with per-pair links it is the busiest directed link.
- *throughput*: ``samples / bottleneck`` samples per second.
- *energy* (DESIGN.md, "energy attributable to a job"): every participating device draws its
  active power while computing and its idle power for the rest of the period between
  microbatches; while sending it also draws its transmit power. ``power_tx_w`` is an increment
  on top of the compute or idle draw (catalogue figures have a transmit power below the idle
  power, which only makes sense as the radio's extra draw). The period is the steady-state one:
  ``1 / throughput`` per microbatch, or ``1 / rate_rps`` when the workload asks for fewer
  requests per second than the plan can serve. Devices not in the plan cost nothing.
- *memory*: see ``stage_memory_bytes``.
- *power modes*: a device share may name the power mode its device runs in
  (``DeviceShare.mode``); the device is then priced at that mode's speed and active power
  (``DeviceProfile.in_mode``), everything else as above.

Training is modelled as the same pipeline with forward+backward compute and two-way transfers;
a step is synchronous (the optimiser step ends it), so steps do not overlap and the time between
batches is the step latency. A training step may be cut into ``m`` microbatches of ``microbatch``
samples (GPipe, as the runtime and the simulator run it: every microbatch goes forward, then
every one goes back): stages then work on different microbatches at once, and each pass takes
``sum of its stage and transfer times + (m - 1) x its slowest element`` (a flow shop of identical
jobs), the slowest element being a stage's compute or the network term of one microbatch. The
work and the bytes of a step do not change, only how long the devices wait for each other, so
energy is the same formula over the shorter step. ``microbatch_options`` lists the sizes a plan
can take (whole samples on every replica); inference keeps one microbatch per request.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from doramesh.types import (
    DeviceProfile,
    LayerTable,
    Network,
    NodeId,
    Prediction,
    StagePlan,
    Workload,
    WorkloadKind,
)

#: Microbatches a stage holds at once during inference: one computing, one arriving
#: (double buffering lets the next activation stream in while the current one is computed).
INFERENCE_INFLIGHT_MICROBATCHES = 2
#: Microbatches whose activations a training stage keeps for their backward pass.
TRAINING_INFLIGHT_MICROBATCHES = 2
#: Bytes of training state per parameter byte: weights, gradients and Adam's two moments.
TRAINING_STATE_FACTOR = 4
#: Floor of the time between microbatches, so a degenerate (zero-FLOP) model still has a
#: finite throughput.
MIN_BOTTLENECK_S = 1e-9

DeviceLookup = Mapping[str, DeviceProfile] | Iterable[DeviceProfile]


def direction_factor(kind: WorkloadKind) -> int:
    """How many times a stage boundary is crossed per microbatch (training sends gradients back)."""
    return 2 if kind == "training" else 1


def layer_gflops(table: LayerTable, kind: WorkloadKind) -> list[float]:
    """Per-sample GFLOP of each layer for this kind of workload (training adds the backward)."""
    if kind == "training":
        return [layer.gflops + layer.backward_gflops for layer in table.layers]
    return [layer.gflops for layer in table.layers]


def input_bytes_of(table: LayerTable, index: int) -> int:
    """Per-sample bytes entering layer ``index``: the model input or the previous activation."""
    return table.input_bytes if index == 0 else table.layers[index - 1].activation_bytes


def inflight_microbatches(kind: WorkloadKind) -> int:
    return TRAINING_INFLIGHT_MICROBATCHES if kind == "training" else INFERENCE_INFLIGHT_MICROBATCHES


def stage_memory_bytes(
    table: LayerTable,
    first: int,
    last: int,
    *,
    samples: int,
    kind: WorkloadKind = "inference",
) -> int:
    """Bytes a device needs to run layers ``first..last`` (inclusive) on ``samples`` samples.

    Inference: the stage's parameters plus, for each in-flight microbatch, the largest transient
    footprint of any of its layers (its input, its output and its workspace are alive together).
    Training: parameters times ``TRAINING_STATE_FACTOR`` (weights, gradients, optimiser moments)
    plus, for each in-flight microbatch, every layer's input kept for the backward pass, the
    stage output and the largest workspace.

    Both grow when the range grows, which the dynamic program relies on (a range that does not
    fit cannot fit after extending it).
    """
    if not 0 <= first <= last < len(table.layers):
        raise ValueError(f"bad layer range {first}..{last} for {len(table.layers)} layers")
    layers = table.layers[first : last + 1]
    params = sum(layer.param_bytes for layer in layers)
    inflight = inflight_microbatches(kind)
    if kind == "training":
        kept = sum(input_bytes_of(table, i) for i in range(first, last + 1))
        kept += table.layers[last].activation_bytes
        workspace = max(layer.workspace_bytes for layer in layers)
        return params * TRAINING_STATE_FACTOR + (kept + workspace) * samples * inflight
    peak = max(
        input_bytes_of(table, i) + layer.activation_bytes + layer.workspace_bytes
        for i, layer in zip(range(first, last + 1), layers, strict=True)
    )
    return params + peak * samples * inflight


def samples_for_share(share: float, batch: int) -> int:
    """Whole samples a replica holds when it takes ``share`` of a microbatch of ``batch``."""
    return max(1, math.ceil(share * batch - 1e-9)) if share > 0 else 0


def fits(stage: StagePlan, devices: DeviceLookup, table: LayerTable, workload: Workload) -> bool:
    """Whether every device of the stage has the memory for its part of it."""
    lookup = _lookup(devices)
    for member in stage.devices:
        samples = samples_for_share(member.share, workload.batch)
        if samples == 0:
            continue
        need = stage_memory_bytes(
            table, stage.first, stage.last, samples=samples, kind=workload.kind
        )
        if need > lookup[member.id].memory_bytes:
            return False
    return True


def wire_seconds(nbytes: float, bandwidth_mbps: float) -> float:
    """Seconds to put ``nbytes`` on a link of ``bandwidth_mbps`` (inf when there is no link)."""
    if nbytes <= 0:
        return 0.0
    if bandwidth_mbps <= 0:
        return math.inf
    return nbytes * 8.0 / (bandwidth_mbps * 1e6)


@dataclass(frozen=True, slots=True)
class PlanCost:
    """The cost model's breakdown of one plan, per microbatch; times in seconds."""

    compute_s: tuple[float, ...]
    """Per stage: the slowest replica's compute time."""
    transfer_s: tuple[float, ...]
    """Per boundary between stage k and k+1: wire plus latency, both ways for training."""
    sync_s: float
    """Training only: gradient all-reduce inside data-parallel groups, per microbatch."""
    network_s: float
    """The network's share of the bottleneck (wire time, summed on a shared medium)."""
    latency_s: float
    bottleneck_s: float
    period_s: float
    """Steady-state time between microbatches that energy is charged over."""
    energy_j: float
    """Energy per microbatch over all participating devices."""
    batch: int
    microbatch: int = 0
    """Samples per microbatch of a training step (0: the whole batch, one microbatch)."""

    @property
    def microbatches(self) -> int:
        """Microbatches per ``batch`` (1 unless a training step is cut into several)."""
        return self.batch // self.microbatch if self.microbatch else 1

    @property
    def throughput_sps(self) -> float:
        return self.batch / self.bottleneck_s

    @property
    def energy_j_per_sample(self) -> float:
        return self.energy_j / self.batch

    def prediction(self) -> Prediction:
        return Prediction(
            latency_ms=self.latency_s * 1e3,
            throughput_sps=self.throughput_sps,
            energy_j_per_sample=self.energy_j_per_sample,
        )


def evaluate(
    stages: Sequence[StagePlan],
    devices: DeviceLookup,
    table: LayerTable,
    network: Network,
    workload: Workload,
    *,
    microbatch: int | None = None,
) -> PlanCost:
    """Cost breakdown of a plan (see the module docstring for the model).

    ``microbatch`` (training only; default the whole batch) is the samples per microbatch of a
    GPipe step; it must divide the batch. Raises ``KeyError`` for a device id that ``devices``
    does not know and ``ValueError`` for stages that do not cover the layers in order or a
    microbatch that does not divide the batch.
    """
    _check_cover(stages, len(table.layers))
    lookup = in_modes(_lookup(devices), stages)
    kind = workload.kind
    batch = workload.batch
    count = _microbatch_count(workload, microbatch)
    dirs = direction_factor(kind)
    gflops = layer_gflops(table, kind)
    forward_gflops = [layer.gflops for layer in table.layers]

    busy: dict[NodeId, float] = {}
    sending: dict[NodeId, float] = {}
    link_load: dict[tuple[NodeId, NodeId], float] = {}
    forward_load: dict[tuple[NodeId, NodeId], float] = {}

    def send(src: NodeId, dst: NodeId, seconds: float) -> None:
        sending[src] = sending.get(src, 0.0) + seconds
        link_load[(src, dst)] = link_load.get((src, dst), 0.0) + seconds

    compute: list[float] = []
    forward_part: list[float] = []  # per stage: the forward's share of its compute time
    for stage in stages:
        work = sum(gflops[stage.first : stage.last + 1])
        slowest = 0.0
        for member in stage.devices:
            device = lookup[member.id]
            seconds = work * member.share * batch / device.gflops
            busy[member.id] = busy.get(member.id, 0.0) + seconds
            slowest = max(slowest, seconds)
        compute.append(slowest)
        forward = sum(forward_gflops[stage.first : stage.last + 1])
        forward_part.append(forward / work if work > 0 else 1.0)

    transfers: list[float] = []
    wires: list[float] = []  # per boundary, one direction, without path latency
    latencies: list[float] = []
    for before, after in itertools.pairwise(stages):
        nbytes = table.layers[before.last].activation_bytes * batch
        per_sender: dict[NodeId, float] = {}
        worst_latency = 0.0
        for src in before.devices:
            for dst in after.devices:
                if src.id == dst.id:
                    continue
                bandwidth, latency_ms = network.link(src.id, dst.id)
                wire = wire_seconds(nbytes * src.share * dst.share, bandwidth)
                if wire == 0.0:
                    continue
                send(src.id, dst.id, wire)
                forward_load[(src.id, dst.id)] = forward_load.get((src.id, dst.id), 0.0) + wire
                if dirs == 2:  # the gradient goes back over the same pair
                    send(dst.id, src.id, wire)
                per_sender[src.id] = per_sender.get(src.id, 0.0) + wire
                worst_latency = max(worst_latency, latency_ms / 1e3)
        if not per_sender:
            transfers.append(0.0)
            wires.append(0.0)
            latencies.append(0.0)
            continue
        if network.kind == "shared":
            wire_time = sum(per_sender.values())  # one medium: transfers take turns
        else:
            wire_time = max(per_sender.values())  # disjoint links run in parallel
        transfers.append(dirs * (wire_time + worst_latency))
        wires.append(wire_time)
        latencies.append(worst_latency)

    sync = 0.0
    if kind == "training":
        sync = _allreduce(stages, lookup, table, network, send)

    if network.kind == "shared":
        network_s = sum(link_load.values())
    else:
        network_s = max(link_load.values(), default=0.0)
    latency_s = sum(compute) + sum(transfers) + sync
    if kind == "training" and count > 1:
        latency_s = (
            _gpipe_step(compute, forward_part, wires, latencies, forward_load, network, count)
            + sync
        )
    bottleneck = max(max(compute, default=0.0), network_s, MIN_BOTTLENECK_S)
    if kind == "training":
        # A synchronous step (forward, backward, gradient sync, optimiser) must finish before
        # the next step's forward can start with the new weights: steps do not overlap, so
        # the time between batches is the step time itself.
        bottleneck = max(bottleneck, latency_s)
    period = bottleneck
    if workload.rate_rps > 0:
        period = max(period, 1.0 / workload.rate_rps)

    energy = 0.0
    # Ordered, so the sum (and a plan's reported figure) does not depend on hash seeds.
    for node_id in dict.fromkeys(m.id for s in stages for m in s.devices):
        device = lookup[node_id]
        computing = busy.get(node_id, 0.0)
        energy += (
            device.power_idle_w * period
            + (device.power_active_w - device.power_idle_w) * computing
            + device.power_tx_w * sending.get(node_id, 0.0)
        )
    return PlanCost(
        compute_s=tuple(compute),
        transfer_s=tuple(transfers),
        sync_s=sync,
        network_s=network_s,
        latency_s=latency_s,
        bottleneck_s=bottleneck,
        period_s=period,
        energy_j=energy,
        batch=batch,
        microbatch=batch // count if kind == "training" else 0,
    )


def microbatch_options(stages: Sequence[StagePlan], workload: Workload) -> tuple[int, ...]:
    """Microbatch sizes a plan can run with, the whole batch first.

    Inference: the batch (a request is one microbatch). Training: every divisor of the batch
    that gives each replica of a data-parallel group a whole number of samples, at least one,
    of every microbatch (the runtime splits microbatches by whole samples).
    """
    batch = workload.batch
    if workload.kind != "training":
        return (batch,)
    options = []
    for size in range(batch, 0, -1):
        if batch % size:
            continue
        whole = True
        for stage in stages:
            members = [m for m in stage.devices if m.share > 0]
            if len(members) < 2:
                continue
            for member in members:
                samples = member.share * size
                if round(samples) < 1 or abs(samples - round(samples)) > 1e-6:
                    whole = False
                    break
            if not whole:
                break
        if whole:
            options.append(size)
    return tuple(options)


def _microbatch_count(workload: Workload, microbatch: int | None) -> int:
    """Microbatches per batch; only a training step is ever cut into several."""
    if microbatch is None or microbatch == workload.batch:
        return 1
    if workload.kind != "training":
        raise ValueError(
            f"an inference request is one microbatch of {workload.batch}, got {microbatch}"
        )
    if not 1 <= microbatch <= workload.batch or workload.batch % microbatch:
        raise ValueError(f"microbatch must divide the batch of {workload.batch}, got {microbatch}")
    return workload.batch // microbatch


def _gpipe_step(
    compute: Sequence[float],
    forward_part: Sequence[float],
    wires: Sequence[float],
    latencies: Sequence[float],
    forward_load: Mapping[tuple[NodeId, NodeId], float],
    network: Network,
    count: int,
) -> float:
    """Forward and backward passes of a GPipe step of ``count`` equal microbatches.

    Each pass is a flow shop of identical jobs: ``sum of its elements + (count - 1) x the
    slowest``, the elements being every stage's compute and every transfer of one microbatch;
    on a shared medium all of a microbatch's transfers take turns on one resource, so the
    network element is their sum. The gradient all-reduce follows (``_allreduce``).
    """
    if network.kind == "shared":
        network_one = sum(forward_load.values()) / count
    else:
        # A sender's transfers to several replicas take turns on its interface.
        busiest = max(forward_load.values(), default=0.0)
        network_one = max(busiest, *wires, 0.0) / count
    hops = sum(w / count + lat for w, lat in zip(wires, latencies, strict=True))
    step = 0.0
    for part in (forward_part, [1.0 - f for f in forward_part]):
        stage_times = [c * f / count for c, f in zip(compute, part, strict=True)]
        slowest = max(max(stage_times, default=0.0), network_one)
        step += sum(stage_times) + hops + (count - 1) * slowest
    return step


def predict(
    stages: Sequence[StagePlan],
    devices: DeviceLookup,
    table: LayerTable,
    network: Network,
    workload: Workload,
    *,
    microbatch: int | None = None,
) -> Prediction:
    """Predicted latency, throughput and energy per sample of a plan."""
    return evaluate(stages, devices, table, network, workload, microbatch=microbatch).prediction()


def _allreduce(
    stages: Sequence[StagePlan],
    lookup: Mapping[str, DeviceProfile],
    table: LayerTable,
    network: Network,
    send: Callable[[NodeId, NodeId, float], None],
) -> float:
    """Ring all-reduce of each replicated stage's gradients; returns its time per step.

    Each of the ``n`` replicas sends ``2 (n-1)/n`` of the stage's parameter bytes to its ring
    neighbour, in ``2 (n-1)`` latency-bound steps.
    """
    total = 0.0
    for stage in stages:
        ring = [m.id for m in stage.devices if m.share > 0]
        n = len(ring)
        if n < 2:
            continue
        params = sum(table.layers[i].param_bytes for i in stage.layers)
        nbytes = 2.0 * (n - 1) / n * params
        wires: list[float] = []
        worst_latency = 0.0
        for k, src in enumerate(ring):
            dst = ring[(k + 1) % n]
            bandwidth, latency_ms = network.link(src, dst)
            wire = wire_seconds(nbytes, bandwidth)
            send(src, dst, wire)
            wires.append(wire)
            worst_latency = max(worst_latency, latency_ms / 1e3)
        wire_time = sum(wires) if network.kind == "shared" else max(wires)
        total += wire_time + 2 * (n - 1) * worst_latency
    return total


def in_modes(
    lookup: Mapping[str, DeviceProfile], stages: Sequence[StagePlan]
) -> Mapping[str, DeviceProfile]:
    """The devices as they run in the plan: each in the power mode its shares name.

    Raises ``ValueError`` for a mode the device does not have or a device named in two modes
    (one device runs one mode at a time).
    """
    modes: dict[str, str] = {}
    for stage in stages:
        for member in stage.devices:
            if modes.setdefault(member.id, member.mode) != member.mode:
                raise ValueError(
                    f"device {member.id} is in two power modes: {modes[member.id]!r} and "
                    f"{member.mode!r}"
                )
    if not any(modes.values()):
        return lookup
    out = dict(lookup)
    for node_id, mode in modes.items():
        if mode and node_id in lookup:
            try:
                out[node_id] = lookup[node_id].in_mode(mode)
            except KeyError as err:
                raise ValueError(str(err.args[0])) from None
    return out


def _lookup(devices: DeviceLookup) -> Mapping[str, DeviceProfile]:
    if isinstance(devices, Mapping):
        return devices
    return {d.node_id: d for d in devices}


def _check_cover(stages: Sequence[StagePlan], n_layers: int) -> None:
    expected = 0
    for stage in stages:
        if stage.first != expected or stage.last < stage.first:
            raise ValueError(
                f"stages must cover layers 0..{n_layers - 1} in order; got a stage "
                f"{stage.first}..{stage.last} where layer {expected} was expected"
            )
        if not stage.devices:
            raise ValueError(f"stage {stage.first}..{stage.last} has no device")
        expected = stage.last + 1
    if expected != n_layers:
        raise ValueError(f"stages cover layers 0..{expected - 1} of 0..{n_layers - 1}")
