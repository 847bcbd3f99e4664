"""Baseline planners: the honest comparison for doramesh's planner (DESIGN.md, "Baseline planners").

Each baseline stands for what a real system does (ANCHORS.md) and is written to be as good as
that system is, no better and no worse: none of them reads the QoE spec (the systems they stand
for have none), and none is a strawman. They share doramesh's analytical cost model, so every
plan's ``predicted`` comes from ``cost.predict`` exactly as doramesh's own plans do, and the
simulator scores them all the same way.

=======================  ==========================================================================
``single-device``        the fastest device that holds the whole model
``uniform``              equal layer counts over all devices in the given order (DeepSpeed's
                         ``partition_method="uniform"``, the even split of pipeline libraries)
``memory-proportional``  exo's ring: layer counts in proportion to device memory, largest first
``throughput-optimal``   PipeDream / Asteroid: hybrid pipeline + data parallel, max throughput
``latency-optimal``      EdgeShard: device selection + partition minimising one request's latency
``data-parallel``        the whole model on every device that holds it, the batch split by speed
=======================  ==========================================================================

Every baseline has the signature of ``PlannerFn`` and returns a ``PlanSet`` of one plan whose
microbatch is the workload's batch, except that throughput-optimal, like PipeDream and Asteroid,
cuts a training step into the microbatches that pipeline best (the others stand for systems
that do not: exo and EdgeShard serve inference, and DeepSpeed's default is one microbatch a step,
``gradient_accumulation_steps=1``). A data-parallel group splits a microbatch into *whole*
samples in proportion to speed (largest remainder, as the runtime's ``split_by_shares`` does), so
a plan never counts on half a sample: with a batch of one, a group is its fastest member alone.
A baseline that cannot place the model (memory, missing links) raises ``FailedPrecondition``
naming the reason, as the system it stands for would fail at load time.

Pure: no gRPC, no torch, no I/O.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import structlog

from doramesh.errors import FailedPrecondition
from doramesh.types import (
    DeviceProfile,
    DeviceShare,
    Flow,
    LayerTable,
    Network,
    NodeId,
    Objective,
    Plan,
    PlanId,
    PlanSet,
    QoESpec,
    StagePlan,
    Workload,
)

from . import cost, dp

_log = structlog.get_logger("planner.baselines")

#: Time the throughput-optimal dynamic program may take when the caller sets no limit.
DEFAULT_TIME_LIMIT_S = 10.0
#: The pure pipelines throughput-optimal also weighs: the steady-state max-throughput one, and
#: the least-latency one, which is the fastest when a synchronous training step makes the time
#: between batches the step's latency (``cost.evaluate``).
_PIPELINE_OBJECTIVES: tuple[Objective, ...] = ("max_throughput", "min_latency")


class PlannerFn(Protocol):
    """What every baseline (and the dispatcher in ``api``) calls."""

    def __call__(
        self,
        devices: Sequence[DeviceProfile],
        table: LayerTable,
        network: Network,
        workload: Workload,
        qoe: QoESpec,
        *,
        time_limit_s: float | None = None,
    ) -> PlanSet: ...


# ---------------------------------------------------------------------------------------------
# The baselines


def single_device(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    time_limit_s: float | None = None,
) -> PlanSet:
    """The whole model on the fastest device that holds it (ties: more memory, then fleet order).

    Stands for running a model where it fits, with no distribution at all: the reference every
    distributed plan must beat to be worth its network traffic and extra devices.
    """
    name = "single-device"
    _require_devices(devices, name)
    need = _whole_model_bytes(table, workload)
    fitting = [d for d in devices if d.memory_bytes >= need]
    if not fitting:
        raise FailedPrecondition(f"{name}: {_no_device_holds(devices, table, workload)}")
    best = max(fitting, key=lambda d: (d.gflops, d.memory_bytes))  # max keeps the first on ties
    stage = StagePlan(0, len(table.layers) - 1, (DeviceShare(best.node_id, 1.0),))
    return _plan_set(name, (stage,), devices, table, network, workload)


def uniform(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    time_limit_s: float | None = None,
) -> PlanSet:
    """Equal layer counts over every device, one stage each, in the order the fleet lists them.

    Stands for the default split of pipeline libraries: DeepSpeed's ``PipelineModule`` with
    ``partition_method="uniform"`` (``ds_utils.partition_uniform``: ``N // D`` layers a stage,
    the first ``N % D`` stages one more) and the even ``split_spec`` people write for
    ``torch.distributed.pipelining``. Devices are ranks in launch order; speed, memory and links
    play no part. With more devices than layers the last devices get nothing, as in DeepSpeed
    (they would only pass activations on, so they are left out of the plan). A stage that does
    not fit its device fails, as those libraries fail to load it.
    """
    name = "uniform"
    _require_devices(devices, name)
    n_layers, n_parts = len(table.layers), len(devices)
    chunk, residual = divmod(n_layers, n_parts)
    edges = [0]
    for k in range(n_parts):
        edges.append(edges[-1] + chunk + (1 if k < residual else 0))
    stages = tuple(
        StagePlan(edges[k], edges[k + 1] - 1, (DeviceShare(devices[k].node_id, 1.0),))
        for k in range(n_parts)
        if edges[k + 1] > edges[k]
    )
    _check_pipeline(name, stages, devices, table, network, workload)
    return _plan_set(name, stages, devices, table, network, workload)


def memory_proportional(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    time_limit_s: float | None = None,
) -> PlanSet:
    """Layer counts in proportion to device memory over every device, largest first: exo's ring.

    exo orders its ring by memory (``RingMemoryWeightedPartitioningStrategy``: (memory, id)
    descending) and gives each node a contiguous range sized by its share of the ring's memory.
    The counts follow exo's current ``allocate_layers_proportionally``: ``share * N`` floored,
    the remainder to the largest fractional parts, and at least one layer a node (taken from the
    node with the most), which fails with fewer layers than devices. (exo's older
    ``map_partitions_to_shards`` truncated rounded fractions instead, which could leave the
    first node empty; the largest-remainder split is the strategy without that artefact.)
    Compute speed and bandwidth play no part. A range that does not fit its device fails, as
    exo refuses a node whose layers need more than its memory.
    """
    name = "memory-proportional"
    _require_devices(devices, name)
    ring = sorted(devices, key=lambda d: (d.memory_bytes, d.node_id), reverse=True)
    n_layers = len(table.layers)
    if n_layers < len(ring):
        raise FailedPrecondition(
            f"{name}: {n_layers} layers cannot give each of {len(ring)} devices at least one"
        )
    total = sum(d.memory_bytes for d in ring)
    counts = proportional_counts(n_layers, [d.memory_bytes / total for d in ring])
    stages: list[StagePlan] = []
    first = 0
    for device, count in zip(ring, counts, strict=True):
        stages.append(StagePlan(first, first + count - 1, (DeviceShare(device.node_id, 1.0),)))
        first += count
    _check_pipeline(name, stages, devices, table, network, workload)
    return _plan_set(name, tuple(stages), devices, table, network, workload)


def proportional_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """``total`` items split by ``fractions`` (largest remainder), at least one each: exo's
    ``allocate_layers_proportionally``. Needs ``total >= len(fractions)``."""
    raw = [f * total for f in fractions]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda k: raw[k] - counts[k], reverse=True)
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    for k in range(len(counts)):
        if counts[k] == 0:
            largest = max(range(len(counts)), key=lambda m: counts[m])
            counts[largest] -= 1
            counts[k] = 1
    return counts


def throughput_optimal(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    time_limit_s: float | None = None,
) -> PlanSet:
    """The hybrid pipeline + data-parallel plan with the highest throughput: PipeDream / Asteroid.

    PipeDream's planner (Narayanan et al., SOSP 2019) is a dynamic program over contiguous stage
    cut points and over how many workers each stage gets as data-parallel replicas, minimising
    the slowest of stage compute (with the replicas' gradient all-reduce when training) and
    inter-stage transfers; Asteroid (Ye et al., MobiCom 2024) plans hybrid pipeline parallelism
    on heterogeneous edge devices with a program of that kind, memory as a constraint. This is
    that program over doramesh's cost model, exact for its search space: devices sorted by
    compute speed (fastest first), each stage on a contiguous group of that order, the group's
    replicas sharing the microbatch in proportion to speed. A device of a group that cannot hold
    the stage sits that stage out, and devices between groups or after the last may stay
    unused, so a device that would only slow the plan down (a slow link, a costly all-reduce)
    is left out. The bottleneck is ``cost.evaluate``'s: the longest stage and the network term
    (all wire times summed on a shared medium, the busiest link otherwise).

    Heterogeneous devices make the order of pipeline stages matter, which PipeDream (identical
    workers) never had to consider and the speed-sorted order settles only roughly. So that no
    pure pipeline beats this baseline merely by ordering its devices differently, it also weighs
    the exact best pipelines over every device order (``dp.best_plan`` without QoE bounds, for
    the ``max_throughput`` objective and, since a synchronous training step's throughput is
    batch / step latency, for ``min_latency``) and keeps whichever plan the cost model gives the
    higher throughput (then the lower latency). It plans for throughput alone: energy and
    latency SLOs play no part.

    Microbatch: inference keeps the workload's batch (a request is one microbatch; under this
    cost model compute and wire time scale with it and path latency overlaps, so throughput
    does not depend on it). Training is where PipeDream and Asteroid pipeline microbatches: a
    step cut into ``m`` of them keeps every stage busy (GPipe), so for training the search
    also runs on the steady-state pipeline (PipeDream's own objective, the limit of many
    microbatches), and every candidate takes the microbatch size of the highest throughput.
    """
    name = "throughput-optimal"
    _require_devices(devices, name)
    limit = DEFAULT_TIME_LIMIT_S if time_limit_s is None else time_limit_s
    deadline = time.monotonic() + max(limit, 0.0)
    training = workload.kind == "training" and workload.batch >= 2
    candidates: list[tuple[StagePlan, ...]] = []
    timed_out = False
    for steady in (False, True) if training else (False,):
        search = _HybridSearch(
            _by_speed(devices), table, network, workload, deadline, steady=steady
        )
        hybrid = search.solve()
        if hybrid is not None:
            candidates.append(hybrid)
        elif search.timed_out:
            timed_out = True
            _log.warning(
                "throughput-optimal: the hybrid search ran out of time; pure pipelines only",
                time_limit_s=limit,
                devices=len(devices),
                layers=len(table.layers),
            )
    for objective in _PIPELINE_OBJECTIVES:
        try:
            pipeline = dp.best_plan(
                devices,
                table,
                network,
                workload,
                QoESpec(objective=objective),
                time_limit_s=max(deadline - time.monotonic(), 0.0),
            )
        except FailedPrecondition:
            continue
        candidates.append(pipeline.stages)
    if training:
        steady_pipeline = _steady_pipeline(devices, table, network, workload, deadline)
        if steady_pipeline is not None:
            candidates.append(steady_pipeline)
    if not candidates:
        if timed_out:
            raise FailedPrecondition(f"{name}: the search ran out of time; raise time_limit_s")
        raise FailedPrecondition(f"{name}: {_no_split_fits(devices, table, workload)}")

    ranked: list[tuple[tuple[float, float], tuple[StagePlan, ...], int]] = []
    for stages in candidates:
        for size in cost.microbatch_options(stages, workload):
            pc = cost.evaluate(stages, devices, table, network, workload, microbatch=size)
            ranked.append(((pc.bottleneck_s, pc.latency_s), stages, size))
    _, best, microbatch = min(ranked, key=lambda r: (r[0], -r[2]))
    return _plan_set(name, best, devices, table, network, workload, microbatch=microbatch)


def _steady_pipeline(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    deadline: float,
) -> tuple[StagePlan, ...] | None:
    """The pure pipeline of highest steady-state throughput over every device order (the
    exact DP on the ``dp.MAX_EXACT_DEVICES`` fastest devices): for a training step cut into
    many microbatches, which the step-priced ``dp.best_plan`` does not see."""
    considered = dp._fastest(devices)
    pb = dp._Problem(considered, table, network, workload, steady=True)
    bounds = dp._Bounds(math.inf, math.inf, math.inf)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    stages, _, _ = dp._solve(pb, "max_throughput", bounds, "auto", time.perf_counter() + remaining)
    if stages is None:
        return None
    return dp._stage_plans(pb, stages)


def latency_optimal(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    time_limit_s: float | None = None,
) -> PlanSet:
    """The pipeline with the least latency for one request: EdgeShard's joint device selection
    and partition.

    EdgeShard (Zhang et al., 2024/2025) is a dynamic program over layers x (device, set of used
    devices): which devices take part, in which order, and where to cut, each device holding one
    contiguous range within its memory, minimising compute plus transfer time. That is exactly
    doramesh's exact DP with the ``min_latency`` objective and no QoE bounds, so this calls
    ``dp.best_plan`` that way (it considers the ``dp.MAX_EXACT_DEVICES`` fastest devices of a
    larger fleet). Two differences from the paper, both shared with every planner here: the
    cost model leaves out the request's trip from and back to the coordinator (the same for
    every plan), and no cloud node exists. Among pipelines it is latency-optimal; with a batch
    of several samples a data-parallel split of the batch can be faster still, which EdgeShard
    does not consider.
    """
    name = "latency-optimal"
    _require_devices(devices, name)
    try:
        plan = dp.best_plan(
            devices,
            table,
            network,
            workload,
            QoESpec(objective="min_latency"),
            time_limit_s=time_limit_s,
        )
    except FailedPrecondition as err:
        raise FailedPrecondition(f"{name}: {err.message}") from err
    return _plan_set(name, plan.stages, devices, table, network, workload)


def data_parallel(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    time_limit_s: float | None = None,
) -> PlanSet:
    """The whole model on every device that holds it, the batch split in proportion to speed.

    Stands for plain data parallelism (PyTorch DDP, Horovod; for inference, replicas behind a
    load balancer), with the batch weighted by speed so a slow replica does not hold the others
    back: one stage, every device whose memory holds the model and its samples, each taking
    whole samples in proportion to its GFLOP/s (a batch of one runs on the fastest alone). Training
    synchronises gradients with a ring all-reduce in the group's order (fastest first). Fails if
    no device holds the model, or if the ring needs a link that does not exist.
    """
    name = "data-parallel"
    _require_devices(devices, name)
    last = len(table.layers) - 1
    group = _replicas(_by_speed(devices), table, 0, last, workload, _MemoryNeed(table, workload))
    if not group:
        raise FailedPrecondition(f"{name}: {_no_device_holds(devices, table, workload)}")
    batch = workload.batch
    stage = StagePlan(0, last, tuple(DeviceShare(d.node_id, c / batch) for d, c in group))
    if workload.kind == "training" and len(group) > 1:
        ring = [d.node_id for d, _ in group]
        for a, b in zip(ring, ring[1:] + ring[:1], strict=True):
            if network.link(a, b)[0] <= 0:
                raise FailedPrecondition(
                    f"{name}: the gradient all-reduce ring needs a link between {a} and {b}"
                )
    return _plan_set(name, (stage,), devices, table, network, workload)


#: Planner name -> baseline, as the bench, ``doramesh plan --planner`` and the API know them.
BASELINES: Mapping[str, PlannerFn] = MappingProxyType(
    {
        "single-device": single_device,
        "uniform": uniform,
        "memory-proportional": memory_proportional,
        "throughput-optimal": throughput_optimal,
        "latency-optimal": latency_optimal,
        "data-parallel": data_parallel,
    }
)


# ---------------------------------------------------------------------------------------------
# Data-parallel groups


def split_by_speed(batch: int, gflops: Sequence[float]) -> list[int]:
    """Whole samples per replica in proportion to speed, summing to ``batch`` (largest
    remainder; ties go to the earlier replica), as the runtime splits a microbatch."""
    total = sum(gflops)
    if total <= 0 or not gflops:
        return [0] * len(gflops)
    exact = [batch * g / total for g in gflops]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(gflops)), key=lambda k: exact[k] - counts[k], reverse=True)
    for k in order[: batch - sum(counts)]:
        counts[k] += 1
    return counts


@functools.lru_cache(maxsize=4096)
def _split_cached(batch: int, gflops: tuple[float, ...]) -> tuple[int, ...]:
    """``split_by_speed`` memoised: the search asks for the same windows over and over."""
    return tuple(split_by_speed(batch, gflops))


class _MemoryNeed:
    """``cost.stage_memory_bytes`` memoised per (first, last, samples)."""

    def __init__(self, table: LayerTable, workload: Workload) -> None:
        self.table = table
        self.kind = workload.kind
        self._cache: dict[tuple[int, int, int], int] = {}

    def __call__(self, first: int, last: int, samples: int) -> int:
        key = (first, last, samples)
        need = self._cache.get(key)
        if need is None:
            need = cost.stage_memory_bytes(self.table, first, last, samples=samples, kind=self.kind)
            self._cache[key] = need
        return need


def _replicas(
    candidates: Sequence[DeviceProfile],
    table: LayerTable,
    first: int,
    last: int,
    workload: Workload,
    need: _MemoryNeed,
) -> tuple[tuple[DeviceProfile, int], ...]:
    """The members of a data-parallel group for layers ``first..last`` and their samples.

    The batch is split by speed over the candidates; those that cannot hold their samples drop
    out and the rest split it again, until every member fits. Candidates with no sample are not
    members. Empty when none can hold the stage.
    """
    pool = list(candidates)
    while pool:
        counts = _split_cached(workload.batch, tuple(d.gflops for d in pool))
        misfits = {
            k
            for k, (device, samples) in enumerate(zip(pool, counts, strict=True))
            if samples > 0 and need(first, last, samples) > device.memory_bytes
        }
        if not misfits:
            return tuple((d, c) for d, c in zip(pool, counts, strict=True) if c > 0)
        pool = [d for k, d in enumerate(pool) if k not in misfits]
    return ()


# ---------------------------------------------------------------------------------------------
# The hybrid dynamic program behind throughput-optimal


@dataclass(frozen=True, slots=True)
class _Group:
    """A stage on a group of replicas, in the cost model's terms."""

    members: tuple[tuple[DeviceProfile, int], ...]
    compute_s: float
    """The slowest replica's compute time per microbatch."""
    sync_wire_s: float
    """Training's all-reduce wire time as the network term sees it: summed over the ring on a
    shared medium, its busiest link otherwise (0 for one replica or inference)."""
    sync_s: float
    """Training's all-reduce time as latency sees it: wire plus the ring's latency-bound steps."""


@dataclass(frozen=True, slots=True)
class _Cut:
    """A transfer between two consecutive stages, in the cost model's terms."""

    element: float
    """Its share of the bottleneck as a max (per-pair links: the busiest pair)."""
    network: float
    """Its share of the bottleneck as a sum (shared medium: all its wire time, both ways)."""
    latency: float
    """Its share of one microbatch's latency."""


_NO_CUT = _Cut(0.0, 0.0, 0.0)

#: A partial plan: (longest element, summed network time, latency, stage (window start,
#: window end, first layer, last layer) or None for the empty plan, parent).
_Label = tuple[float, float, float, "tuple[int, int, int, int] | None", "_Label | None"]
#: The last stage's members as (id, samples): what the next transfer depends on (per-pair links).
_Signature = tuple[tuple[str, int], ...]


class _Timeout(Exception):
    pass


class _HybridSearch:
    """PipeDream / Asteroid's dynamic program over cut points and contiguous device groups.

    States are (layers done ``i``, devices of the sorted order consumed ``p``, the last group's
    members): the members matter only with per-pair links, where a transfer's time depends on
    which devices send and receive it. From a state, the next stage is layers ``i..j`` on the
    group ``p..b-1``, or device ``p`` is skipped.

    A plan's bottleneck in ``cost.evaluate`` is ``max(longest element, summed network)``, and
    for training also its latency (a synchronous step ends before the next begins). Elements
    (stage compute; with per-pair links every transfer and all-reduce) combine by max, the
    shared medium's network time and the latency by sum, so each state keeps the Pareto front
    of the criteria that count, which makes the program exact for its search space.
    """

    def __init__(
        self,
        devices: Sequence[DeviceProfile],
        table: LayerTable,
        network: Network,
        workload: Workload,
        deadline: float,
        *,
        steady: bool = False,
    ) -> None:
        self.devices = tuple(devices)
        self.table = table
        self.network = network
        self.workload = workload
        self.deadline = deadline
        self.shared = network.kind == "shared"
        self.batch = workload.batch
        self.training = workload.kind == "training"
        #: Whether the step's latency is the bottleneck (one microbatch per training step);
        #: ``steady`` is PipeDream's own objective, the pipeline in steady state, which a step
        #: cut into many microbatches approaches.
        self.synchronous = self.training and not steady
        self.dirs = cost.direction_factor(workload.kind)
        self.n_layers = len(table.layers)
        gflops = cost.layer_gflops(table, workload.kind)
        self.work_prefix = [0.0, *itertools.accumulate(gflops)]
        params = [layer.param_bytes for layer in table.layers]
        self.param_prefix = [0, *itertools.accumulate(params)]
        self.need = _MemoryNeed(table, workload)
        self.timed_out = False
        self._groups: dict[tuple[int, int, int, int], _Group | None] = {}
        self._pairs: dict[tuple[_Signature, _Signature], tuple[float, float, float]] = {}
        self._links: dict[tuple[str, str], tuple[float, float]] = {}

    # -- costs, as cost.evaluate charges them ------------------------------------------------

    def link(self, a: str, b: str) -> tuple[float, float]:
        """``network.link`` (bandwidth Mbit/s, latency ms), memoised: it scans the link list."""
        key = (a, b)
        value = self._links.get(key)
        if value is None:
            value = self._links[key] = self.network.link(NodeId(a), NodeId(b))
        return value

    def group(self, a: int, b: int, first: int, last: int) -> _Group | None:
        key = (a, b, first, last)
        if key in self._groups:
            return self._groups[key]
        members = _replicas(self.devices[a:b], self.table, first, last, self.workload, self.need)
        result: _Group | None = None
        if members:
            work = self.work_prefix[last + 1] - self.work_prefix[first]
            compute = max(work * (c / self.batch) * self.batch / d.gflops for d, c in members)
            wire, sync = self._allreduce(members, first, last)
            if math.isfinite(sync):
                result = _Group(members, compute, wire, sync)
        self._groups[key] = result
        return result

    def _allreduce(
        self, members: tuple[tuple[DeviceProfile, int], ...], first: int, last: int
    ) -> tuple[float, float]:
        """(network term, latency) of the ring all-reduce, as ``cost._allreduce``: each of
        ``n`` replicas sends ``2 (n-1)/n`` of the stage's parameter bytes to its neighbour, in
        ``2 (n-1)`` latency-bound steps."""
        n = len(members)
        if not self.training or n < 2:
            return 0.0, 0.0
        nbytes = 2.0 * (n - 1) / n * (self.param_prefix[last + 1] - self.param_prefix[first])
        wires: list[float] = []
        worst_latency = 0.0
        for k in range(n):
            bandwidth, latency_ms = self.link(
                members[k][0].node_id, members[(k + 1) % n][0].node_id
            )
            wires.append(cost.wire_seconds(nbytes, bandwidth))
            worst_latency = max(worst_latency, latency_ms / 1e3)
        wire = sum(wires) if self.shared else max(wires)
        return wire, wire + 2 * (n - 1) * worst_latency

    def cut(self, before: _Signature, after: _Signature, first: int) -> _Cut:
        """The transfer into layer ``first`` from the group ``before`` to the group ``after``."""
        nbytes = self.table.layers[first - 1].activation_bytes * self.batch
        if nbytes <= 0:
            return _NO_CUT  # nothing crosses, so no link is needed either
        if self.shared:
            wire = cost.wire_seconds(nbytes, self.network.bandwidth_mbps)
            latency = self.dirs * (wire + self.network.latency_ms / 1e3)
            return _Cut(0.0, self.dirs * wire, latency)
        key = (before, after)
        pair = self._pairs.get(key)
        if pair is None:
            # wire_seconds is linear in bytes: per byte, the busiest pair, the busiest
            # sender (its pairs take turns), and the worst path latency.
            busiest = sender = worst_latency = 0.0
            for src, s_samples in before:
                sending = 0.0
                for dst, d_samples in after:
                    bandwidth, latency_ms = self.link(src, dst)
                    share = (s_samples / self.batch) * (d_samples / self.batch)
                    wire = cost.wire_seconds(share, bandwidth)
                    busiest = max(busiest, wire)
                    sending += wire
                    worst_latency = max(worst_latency, latency_ms / 1e3)
                sender = max(sender, sending)
            pair = self._pairs[key] = (busiest, sender, worst_latency)
        busiest, sender, worst_latency = pair
        return _Cut(busiest * nbytes, 0.0, self.dirs * (sender * nbytes + worst_latency))

    def value(self, element: float, network: float, latency: float) -> float:
        """A (partial) plan's bottleneck, as ``cost.evaluate`` computes it."""
        bottleneck = max(element, network)
        return max(bottleneck, latency) if self.synchronous else bottleneck

    # -- search -----------------------------------------------------------------------------

    def solve(self) -> tuple[StagePlan, ...] | None:
        """The best plan in the search space, or None when nothing fits (or time ran out)."""
        try:
            label = self._search()
        except _Timeout:
            self.timed_out = True
            return None
        if label is None:
            return None
        stages: list[StagePlan] = []
        node: _Label | None = label
        while node is not None and node[3] is not None:
            a, b, first, last = node[3]
            group = self.group(a, b, first, last)
            assert group is not None
            shares = tuple(DeviceShare(d.node_id, c / self.batch) for d, c in group.members)
            stages.append(StagePlan(first, last, shares))
            node = node[4]
        return tuple(reversed(stages))

    def _search(self) -> _Label | None:
        n, d_count = self.n_layers, len(self.devices)
        bound = self._upper_bound()
        # states[i][p]: the last group's signature -> labels
        states: list[list[dict[_Signature, list[_Label]]]] = [
            [{} for _ in range(d_count + 1)] for _ in range(n + 1)
        ]
        root: _Label = (0.0, 0.0, 0.0, None, None)
        states[0][0][()] = [root]
        for i in range(n):
            for p in range(d_count + 1):
                if time.monotonic() > self.deadline:
                    raise _Timeout
                fronts: list[tuple[_Signature, list[_Label]]] = []
                for signature, labels in states[i][p].items():
                    front = self._front(labels, bound)
                    if front:
                        fronts.append((signature, front))
                        if p < d_count:  # device p stays unused
                            states[i][p + 1].setdefault(signature, []).extend(front)
                states[i][p] = dict(fronts)
                if not fronts:
                    continue
                for b, j, group in self._next_stages(i, p, bound):
                    after: _Signature = ()
                    if not self.shared:  # only per-pair links care who sends to whom
                        after = tuple((d.node_id, c) for d, c in group.members)
                    element, network = group.compute_s, 0.0
                    if self.shared:
                        network = group.sync_wire_s
                    else:
                        element = max(element, group.sync_wire_s)
                    latency = group.compute_s + group.sync_s
                    bucket = states[j + 1][b].setdefault(after, [])
                    for signature, front in fronts:
                        cut = self.cut(signature, after, i) if i > 0 else _NO_CUT
                        step = (
                            max(element, cut.element),
                            network + cut.network,
                            latency + cut.latency,
                        )
                        if self.value(*step) > bound:
                            continue
                        stage = (p, b, i, j)
                        for lab in front:
                            bucket.append(
                                (
                                    max(lab[0], step[0]),
                                    lab[1] + step[1],
                                    lab[2] + step[2],
                                    stage,
                                    lab,
                                )
                            )
        best: _Label | None = None
        best_key = (math.inf, math.inf)
        for p in range(d_count + 1):
            for labels in states[n][p].values():
                for lab in labels:
                    key = (self.value(lab[0], lab[1], lab[2]), lab[2])  # ties: lower latency
                    if key < best_key:
                        best, best_key = lab, key
        return best

    def _next_stages(self, i: int, p: int, bound: float) -> list[tuple[int, int, _Group]]:
        """(window end, last layer, group) of every stage that can start at layer ``i`` on
        the devices from ``p`` and stay within the bound."""
        out: list[tuple[int, int, _Group]] = []
        most_memory = 0
        speed = 0.0
        for b in range(p + 1, len(self.devices) + 1):
            most_memory = max(most_memory, self.devices[b - 1].memory_bytes)
            speed += self.devices[b - 1].gflops
            for j in range(i, self.n_layers):
                if self.need(i, j, 1) > most_memory:
                    break  # ranges only grow from here
                ideal = (self.work_prefix[j + 1] - self.work_prefix[i]) * self.batch / speed
                if ideal > bound:
                    break  # even a perfect split of this range is too slow
                group = self.group(p, b, i, j)
                if group is not None:
                    out.append((b, j, group))
        return out

    def _front(self, labels: list[_Label], bound: float) -> list[_Label]:
        """Labels within the bound that no other label beats on every criterion that counts.

        Inference: the Pareto front of (element, network). Training: the least latency alone,
        since every stage and transfer adds at least as much latency as its element or network
        time (compute and wire time are part of it), so a plan's latency is its bottleneck and
        the smaller latency stays ahead whatever follows.
        """
        live = [lab for lab in labels if self.value(lab[0], lab[1], lab[2]) <= bound]
        if self.synchronous:
            return [min(live, key=lambda lab: (lab[2], lab[0], lab[1]))] if live else []
        kept: list[_Label] = []
        best_network = math.inf
        for lab in sorted(live, key=lambda lab: (lab[0], lab[1])):
            if lab[1] < best_network:
                kept.append(lab)
                best_network = lab[1]
        return kept

    def _upper_bound(self) -> float:
        """The bottleneck of a plan the search will find or beat (single-stage groups), with a
        little slack for rounding: partial plans above it cannot lead to the optimum."""
        last = self.n_layers - 1
        best = math.inf
        for a in range(len(self.devices)):
            for b in range(a + 1, len(self.devices) + 1):
                group = self.group(a, b, 0, last)
                if group is None:
                    continue
                element, network = group.compute_s, 0.0
                if self.shared:
                    network = group.sync_wire_s
                else:
                    element = max(element, group.sync_wire_s)
                best = min(best, self.value(element, network, group.compute_s + group.sync_s))
        return best * (1 + 1e-9) if math.isfinite(best) else math.inf


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _require_devices(devices: Sequence[DeviceProfile], name: str) -> None:
    if not devices:
        raise FailedPrecondition(f"{name}: no devices to plan on")


def _by_speed(devices: Sequence[DeviceProfile]) -> tuple[DeviceProfile, ...]:
    """Fastest first; equally fast devices keep the fleet's order."""
    return tuple(sorted(devices, key=lambda d: -d.gflops))


def _whole_model_bytes(table: LayerTable, workload: Workload) -> int:
    last = len(table.layers) - 1
    return cost.stage_memory_bytes(table, 0, last, samples=workload.batch, kind=workload.kind)


def _no_device_holds(
    devices: Sequence[DeviceProfile], table: LayerTable, workload: Workload
) -> str:
    need = _whole_model_bytes(table, workload)
    largest = max(devices, key=lambda d: d.memory_bytes)
    return (
        f"no device holds the whole model: it needs {_fmt_bytes(need)} with a batch of "
        f"{workload.batch}, the largest device ({largest.node_id}) has "
        f"{_fmt_bytes(largest.memory_bytes)}"
    )


def _no_split_fits(devices: Sequence[DeviceProfile], table: LayerTable, workload: Workload) -> str:
    need = _whole_model_bytes(table, workload)
    total = sum(d.memory_bytes for d in devices)
    return (
        f"no split of the model fits the fleet's memory: the model needs {_fmt_bytes(need)} "
        f"on one device, the fleet has {_fmt_bytes(total)} in all"
    )


def _check_pipeline(
    name: str,
    stages: Sequence[StagePlan],
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
) -> None:
    """A fixed pipeline must fit each device and have a link between consecutive devices."""
    lookup = {d.node_id: d for d in devices}
    for stage in stages:
        for member in stage.devices:
            need = cost.stage_memory_bytes(
                table, stage.first, stage.last, samples=workload.batch, kind=workload.kind
            )
            has = lookup[member.id].memory_bytes
            if need > has:
                raise FailedPrecondition(
                    f"{name}: layers {stage.first}..{stage.last} need {_fmt_bytes(need)} on "
                    f"{member.id}, which has {_fmt_bytes(has)}"
                )
    for before, after in itertools.pairwise(stages):
        for src in before.devices:
            for dst in after.devices:
                if src.id != dst.id and network.link(src.id, dst.id)[0] <= 0:
                    raise FailedPrecondition(
                        f"{name}: consecutive stages on {src.id} and {dst.id}, which have no link"
                    )


def _plan_set(
    name: str,
    stages: tuple[StagePlan, ...],
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    *,
    microbatch: int | None = None,
) -> PlanSet:
    """One plan, priced by the cost model, with unpaced flows between consecutive stages; its
    microbatch is the workload's batch unless given (throughput-optimal's training steps)."""
    size = workload.batch if microbatch is None else microbatch
    flows: list[Flow] = []
    for before, after in itertools.pairwise(stages):
        for src in before.devices:
            for dst in after.devices:
                if src.id == dst.id:
                    continue
                flows.append(Flow(src=src.id, dst=dst.id))
                if workload.kind == "training":  # gradients flow back
                    flows.append(Flow(src=dst.id, dst=src.id))
    plan = Plan(
        plan_id=_plan_id(name, stages, size),
        stages=stages,
        microbatch=size,
        flows=tuple(flows),
        predicted=cost.predict(stages, devices, table, network, workload, microbatch=size),
    )
    return PlanSet(plans=(plan,), mix={plan.plan_id: 1.0})


def _plan_id(name: str, stages: Sequence[StagePlan], microbatch: int) -> PlanId:
    """Content-derived, prefixed with the baseline's name so a bench report tells them apart."""
    text = ";".join(
        f"{s.first}-{s.last}:" + ",".join(f"{d.id}*{d.share:g}" for d in s.devices) for s in stages
    )
    digest = hashlib.sha256(f"{text}|{microbatch}".encode()).hexdigest()[:12]
    return PlanId(f"{name}-{digest}")


def _fmt_bytes(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


__all__ = [
    "BASELINES",
    "DEFAULT_TIME_LIMIT_S",
    "PlannerFn",
    "data_parallel",
    "latency_optimal",
    "memory_proportional",
    "proportional_counts",
    "single_device",
    "split_by_speed",
    "throughput_optimal",
    "uniform",
]
