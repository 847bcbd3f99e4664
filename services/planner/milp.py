"""The hybrid partitioner: a mixed-integer program in CVXPY, solved with HiGHS.

It decides, at once, where the (coarsened) model is cut into pipeline stages, which group of
devices runs each stage (data-parallel replicas, each with a whole number of the microbatch's
samples), and which devices stay out; under memory, the QoE bounds (latency, throughput, energy
per sample) and a per-device battery budget; minimising latency or energy, or maximising
throughput. Its figures are ``cost.py``'s model, and every plan it returns is re-priced by
``cost.predict`` and checked (memory, bounds, battery) before it leaves this module.

Why whole samples: the runtime splits a microbatch between replicas by whole samples
(``doramesh.streams.split_by_shares``), so a share that is not a multiple of ``1 / microbatch``
is a promise the runtime cannot keep. A group therefore has at most ``microbatch`` members, and a
microbatch of one sample runs every stage on one device.

Formulation (``B`` blocks, ``S`` stage slots, candidate device groups ``c`` called *columns*)
--------------------------------------------------------------------------------------------

- ``Z[s, b]`` (binary staircase): block ``b`` belongs to a stage ``<= s``. Rows are prefixes and
  grow with ``s``, so stage ``s = Z[s] - Z[s-1]`` is a contiguous range; ``Z[s, b] - Z[s, b+1]``
  marks the cut after stage ``s``. Used stages come first, each non-empty.
- ``A[s, c]`` (binary): stage ``s`` runs on column ``c``, at most one per stage. A column is a
  multiset of device *types* (identical devices are interchangeable on a shared medium, which
  keeps big fleets of a few device classes small) with a sample count per member; a type's
  devices are used at most once over all stages.
- Everything a column contributes is a column constant times a linear function of ``Z``: compute
  time ``kappa_c * GFLOP_s`` (``kappa_c = max n_d / g_d``), dynamic energy ``delta_c * GFLOP_s``,
  transmit energy ``txs_c * wire_s``, a training all-reduce ``swire_c * params_s``. The product of
  the binary ``A[s, c]`` and such a linear term is linearised exactly by the standard big-M lower
  bound ``t_s >= k_c * lin_s - k_c * max(lin) * (1 - A[s, c])``: at most one column is active per
  stage, and every ``t_s`` only appears where smaller is better (objective, ``<=`` bounds), so at
  the optimum it equals the active column's value. No share is a variable, so no bilinear
  share-times-FLOPs term arises; the integer splits live in the columns.
- Memory: a column fits a stage ``[i..j]`` iff ``i >= lo_c[j]`` (stage memory grows with the
  range, see ``cost.stage_memory_bytes``), written as ``start_s >= sum_j lo_c[j] * end[s, j]`` when
  ``A[s, c] = 1``; ``lo_c`` is computed from the *original* layers, so it is exact.
- Shared medium: the wire time of a cut is the same whatever groups it joins (every pair of
  replicas shares one medium and the shares on each side sum to one), so transfers are linear
  in ``Z``. Per-pair links: a variable ``omega_s`` bounds ``1 / bandwidth`` over every pair that
  stage ``s`` and ``s + 1`` use (``omega_s >= (y_sd + y_(s+1)e - 1) / bw_de``), and the cut's wire
  time is ``activation * omega_s``: exact for single-device stages, an upper bound (so still
  sound) for groups, whose flows are smaller.
- Energy: idle power is charged over the period ``P = max(bottleneck, 1/rate)``. When the caller
  asks the plan to keep up with the request rate, ``P = 1/rate`` is a constant and energy is
  linear; otherwise the products ``idle_c * P`` are big-M linearised with ``P <= P_max`` (the QoE
  bound, or the incumbent's energy over the least idle draw).
- Battery: a battery-powered device may draw at most ``battery_wh / battery_hours`` watts on
  average: ``dynamic + transmit energy <= (budget - idle) * P`` per member, again linear (with
  ``P`` replaced by a variable that picks one exact term of the period, never above it).
- Training: the all-reduce of a group is a column constant times the stage's parameter bytes;
  a step is synchronous (``cost.py``), so the bottleneck, and the period, is the step latency.

The single-device dynamic program (``dp.py``) is the warm start: its plan is a feasible point of
this program (singleton columns, block-aligned cuts) handed to HiGHS as a MIP start, so a time
limit still returns a plan at least as good as the DP's, with HiGHS' optimality gap.
``brute_force`` enumerates every split, ordered disjoint group and integer sample split for
small instances, scoring them with ``cost.evaluate`` only: the tests' optimality oracle.

Time limit
----------
HiGHS honours its own time limit, but CVXPY's compilation of the program (canonicalisation,
before HiGHS starts) has none, and on a loaded box it takes 0.05-0.9 s, loosely tied to the
program's size. The caller's limit is a promise (the coordinator re-plans live with it), so:

- the program is compiled only when the time left covers a conservative estimate of the compile
  (``_CompileClock``: seconds per unit of program size, measured in this process on every
  compile, the worst of the recent ones, so it follows the box's load) and a minimal solve;
- building, compiling and solving run in a worker thread that the caller waits on until its
  deadline and no longer. A thread cannot be stopped, so a compile that overran is abandoned:
  it finishes on its own, skips HiGHS (no time is left) and releases the one slot there is
  (``_IN_FLIGHT``); until then further calls do not start another program (status ``busy``), so
  abandoned compiles never pile up. Only one thread touches CVXPY at any time.

Whatever happens, the warm start (checked by the cost model) comes back when nothing better
does, with the status saying why the program did not run.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

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
    QoESpec,
    StagePlan,
    Workload,
)

from . import coarsen, cost

_log = structlog.get_logger("planner.milp")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Stage slots the program offers at most (a plan rarely gains from more on edge fleets).
DEFAULT_MAX_STAGES = 8
#: Fleets up to this many devices get every group and integer split as a column (exact).
EXHAUSTIVE_DEVICES = 6
#: Columns at most; beyond it the heuristic candidates are cut, least promising first.
MAX_COLUMNS = 600
#: Groups with more whole-sample splits than this get a few representative ones.
MAX_SPLITS_PER_GROUP = 12
#: Largest data-parallel group the heuristic candidates offer.
MAX_GROUP = 8
#: Device types the program considers at most; a larger fleet is narrowed first.
MAX_TYPES = 24
#: Relative MIP gap at which HiGHS stops.
DEFAULT_MIP_GAP = 1e-6
#: Bounds are met up to this relative slack (the same as ``dp.BOUND_SLACK``).
BOUND_SLACK = 1e-9
#: Brute force enumerates at most this many devices and layers.
BRUTE_FORCE_MAX_DEVICES = 5
BRUTE_FORCE_MAX_LAYERS = 8
#: HiGHS is not started with less than this budget of its own (seconds).
HIGHS_MIN_SECONDS = 0.05
#: The compile-time estimate is the worst per-unit rate of this many recent compiles, times
#: ``COMPILE_SAFETY`` (load on a shared box changes from one compile to the next).
COMPILE_SAMPLES = 8
COMPILE_SAFETY = 1.5
#: Scalar variables per unit of program size; a unit also stands for CVXPY's fixed cost per
#: compile, which dominates small programs (a program of ``v`` variables is ``1 + v / this``).
COMPILE_UNIT_VARIABLES = 2000
#: CVXPY's C++ canonicalisation backend: 1.5-2x faster than ``COO`` on these programs.
CANON_BACKEND = "CPP"

# The program works in milliseconds and millijoules, so that its values sit well above the
# solver's absolute tolerances (1e-6).
_MS = 1e3
_MJ = 1e3
_INF = math.inf
_VERBOSE = False
_EXTRA_OPTIONS: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------
# Bounds and plan helpers shared with the entry point


@dataclass(frozen=True, slots=True)
class Bounds:
    """QoE bounds per microbatch of ``batch`` samples, in seconds and joules (inf = none)."""

    latency_s: float = _INF
    bottleneck_s: float = _INF
    energy_j: float = _INF

    @staticmethod
    def of(qoe: QoESpec, batch: int) -> Bounds:
        return Bounds(
            latency_s=qoe.latency_ms / 1e3 if qoe.latency_ms else _INF,
            bottleneck_s=batch / qoe.min_throughput_sps if qoe.min_throughput_sps else _INF,
            energy_j=qoe.energy_j_per_sample * batch if qoe.energy_j_per_sample else _INF,
        )

    def tightened(self, bottleneck_s: float) -> Bounds:
        return Bounds(self.latency_s, min(self.bottleneck_s, bottleneck_s), self.energy_j)


@dataclass(frozen=True, slots=True)
class IndexedNetwork(Network):
    """A ``Network`` whose ``link`` is a dictionary lookup rather than a scan of the link list:
    a 64-device mesh has 2016 links, and the searches ask for pairs millions of times."""

    index: Mapping[tuple[str, str], tuple[float, float]] = field(default_factory=dict)

    def link(self, a: NodeId, b: NodeId) -> tuple[float, float]:
        if a == b:
            return math.inf, 0.0
        if self.kind != "links":
            return self.bandwidth_mbps, self.latency_ms
        return self.index.get((a, b), (0.0, math.inf))


def indexed(network: Network) -> Network:
    """``network`` with constant-time ``link`` lookups (the same figures; see ``Network.link``:
    a pair listed twice keeps its first entry)."""
    if network.kind != "links" or isinstance(network, IndexedNetwork):
        return network
    index: dict[tuple[str, str], tuple[float, float]] = {}
    for lk in network.links:
        index.setdefault((lk.a, lk.b), (lk.bandwidth_mbps, lk.latency_ms))
        index.setdefault((lk.b, lk.a), (lk.bandwidth_mbps, lk.latency_ms))
    return IndexedNetwork(
        kind=network.kind,
        bandwidth_mbps=network.bandwidth_mbps,
        latency_ms=network.latency_ms,
        links=network.links,
        index=index,
    )


def meets(value: float, bound: float) -> bool:
    return value <= bound * (1 + BOUND_SLACK) + 1e-15


def meets_bounds(pc: cost.PlanCost, bounds: Bounds) -> bool:
    return (
        meets(pc.latency_s, bounds.latency_s)
        and meets(pc.bottleneck_s, bounds.bottleneck_s)
        and meets(pc.energy_j, bounds.energy_j)
    )


def objective_key(objective: Objective, pc: cost.PlanCost) -> tuple[float, float]:
    """Sort key of a plan: the objective first, then a sensible tie-break (as ``dp.py``)."""
    if objective == "min_latency":
        return (pc.latency_s, pc.energy_j)
    if objective == "max_throughput":
        return (pc.bottleneck_s, pc.latency_s)
    return (pc.energy_j, pc.latency_s)


def objective_value(objective: Objective, pc: cost.PlanCost) -> float:
    return objective_key(objective, pc)[0]


def plan_id(stages: Sequence[StagePlan], microbatch: int) -> PlanId:
    """Content-derived id (the same scheme as ``dp.py``): a plan keeps its id across re-plans."""
    text = ";".join(
        f"{s.first}-{s.last}:"
        + ",".join(f"{d.id}*{d.share:g}" + (f"@{d.mode}" if d.mode else "") for d in s.devices)
        for s in stages
    )
    digest = hashlib.sha256(f"{text}|{microbatch}".encode()).hexdigest()[:12]
    return PlanId(f"plan-{digest}")


def make_plan(
    stages: Sequence[StagePlan],
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    *,
    microbatch: int | None = None,
) -> Plan:
    """A plan with ``cost.predict``'s figures and one flow per replica pair, in pipeline order
    (activations forward, then, for training, the gradients back); the network scheduler sets
    their rates. ``microbatch`` (training) cuts a step into microbatches of that many samples;
    by default a step (or a request) is one microbatch."""
    stages = tuple(stages)
    size = workload.batch if microbatch is None else microbatch
    predicted = cost.predict(stages, devices, table, network, workload, microbatch=size)
    flows: list[Flow] = []
    for before, after in itertools.pairwise(stages):
        for src in before.devices:
            for dst in after.devices:
                if src.id != dst.id:
                    flows.append(Flow(src=src.id, dst=dst.id))
    if workload.kind == "training":
        for before, after in reversed(list(itertools.pairwise(stages))):
            for dst in after.devices:
                for src in before.devices:
                    if src.id != dst.id:
                        flows.append(Flow(src=dst.id, dst=src.id))
    return Plan(
        plan_id=plan_id(stages, size),
        stages=stages,
        microbatch=size,
        flows=tuple(flows),
        predicted=predicted,
    )


def device_power_w(
    stages: Sequence[StagePlan],
    devices: Sequence[DeviceProfile] | Mapping[str, DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    *,
    microbatch: int | None = None,
) -> dict[NodeId, float]:
    """Average draw of each participating device under ``cost.py``'s energy model (watts).

    The battery budget needs it per device; ``cost.evaluate`` only reports the sum. A step's
    work and bytes do not depend on ``microbatch``; its length (the period) does.
    """
    lookup: Mapping[str, DeviceProfile] = cost.in_modes(
        devices if isinstance(devices, Mapping) else {d.node_id: d for d in devices}, stages
    )
    pc = cost.evaluate(stages, lookup, table, network, workload, microbatch=microbatch)
    gflops = cost.layer_gflops(table, workload.kind)
    batch = workload.batch
    dirs = cost.direction_factor(workload.kind)
    busy: dict[NodeId, float] = {}
    sending: dict[NodeId, float] = {}
    for stage in stages:
        work = sum(gflops[stage.first : stage.last + 1])
        for m in stage.devices:
            busy[m.id] = busy.get(m.id, 0.0) + work * m.share * batch / lookup[m.id].gflops
    for before, after in itertools.pairwise(stages):
        nbytes = table.layers[before.last].activation_bytes * batch
        for src in before.devices:
            for dst in after.devices:
                if src.id == dst.id:
                    continue
                wire = cost.wire_seconds(
                    nbytes * src.share * dst.share, network.link(src.id, dst.id)[0]
                )
                sending[src.id] = sending.get(src.id, 0.0) + wire
                if dirs == 2:
                    sending[dst.id] = sending.get(dst.id, 0.0) + wire
    if workload.kind == "training":
        for stage in stages:
            ring = [m.id for m in stage.devices if m.share > 0]
            n = len(ring)
            if n < 2:
                continue
            params = sum(table.layers[i].param_bytes for i in stage.layers)
            for k, sender in enumerate(ring):
                wire = cost.wire_seconds(
                    2.0 * (n - 1) / n * params, network.link(sender, ring[(k + 1) % n])[0]
                )
                sending[sender] = sending.get(sender, 0.0) + wire
    out: dict[NodeId, float] = {}
    for node_id in dict.fromkeys(m.id for s in stages for m in s.devices):
        d = lookup[node_id]
        energy = (
            d.power_idle_w * pc.period_s
            + (d.power_active_w - d.power_idle_w) * busy.get(node_id, 0.0)
            + d.power_tx_w * sending.get(node_id, 0.0)
        )
        out[node_id] = energy / pc.period_s
    return out


def battery_ok(
    stages: Sequence[StagePlan],
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    battery_hours: float | None,
    *,
    microbatch: int | None = None,
) -> bool:
    """Whether every battery-powered device lasts ``battery_hours`` at the plan's average draw."""
    if battery_hours is None or not any(d.battery_wh > 0 for d in devices):
        return True
    lookup: dict[str, DeviceProfile] = {d.node_id: d for d in devices}
    power = device_power_w(stages, lookup, table, network, workload, microbatch=microbatch)
    for node_id, watts in power.items():
        capacity = lookup[node_id].battery_wh
        if capacity > 0 and watts * battery_hours > capacity * (1 + BOUND_SLACK):
            return False
    return True


def valid_plan(
    stages: Sequence[StagePlan],
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    bounds: Bounds,
    battery_hours: float | None,
    *,
    microbatch: int | None = None,
) -> cost.PlanCost | None:
    """The plan's cost when it fits memory, has every link it needs, meets the bounds and the
    battery budget; None otherwise."""
    lookup: dict[str, DeviceProfile] = {d.node_id: d for d in devices}
    if not all(cost.fits(s, lookup, table, workload) for s in stages):
        return None
    return _priced(
        stages, devices, lookup, table, network, workload, bounds, battery_hours, microbatch
    )


def best_microbatch(
    stages: Sequence[StagePlan],
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    bounds: Bounds,
    battery_hours: float | None,
    objective: Objective,
) -> cost.PlanCost | None:
    """``valid_plan`` at the microbatch size that serves ``objective`` best (``PlanCost.
    microbatch`` says which): a training step cut into microbatches keeps every stage busy
    on a different one (GPipe), so a pipeline's step, and the idle draw of its devices over
    it, shrink. Inference has one size, the batch."""
    lookup: dict[str, DeviceProfile] = {d.node_id: d for d in devices}
    if not all(cost.fits(s, lookup, table, workload) for s in stages):
        return None
    best: cost.PlanCost | None = None
    for size in cost.microbatch_options(stages, workload):
        pc = _priced(stages, devices, lookup, table, network, workload, bounds, battery_hours, size)
        if pc is not None and (
            best is None or objective_key(objective, pc) < objective_key(objective, best)
        ):
            best = pc
    return best


def _priced(
    stages: Sequence[StagePlan],
    devices: Sequence[DeviceProfile],
    lookup: Mapping[str, DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    bounds: Bounds,
    battery_hours: float | None,
    microbatch: int | None,
) -> cost.PlanCost | None:
    pc = cost.evaluate(stages, lookup, table, network, workload, microbatch=microbatch)
    if not (math.isfinite(pc.latency_s) and math.isfinite(pc.energy_j)):
        return None
    if not meets_bounds(pc, bounds):
        return None
    if not battery_ok(
        stages, devices, table, network, workload, battery_hours, microbatch=microbatch
    ):
        return None
    return pc


# ---------------------------------------------------------------------------------------------
# Columns: candidate device groups with whole-sample splits


@dataclass(frozen=True, slots=True)
class _Type:
    """Interchangeable devices: the same figures (and, with per-pair links, one device)."""

    devices: tuple[DeviceProfile, ...]

    @property
    def head(self) -> DeviceProfile:
        return self.devices[0]

    @property
    def count(self) -> int:
        return len(self.devices)


@dataclass(frozen=True, slots=True)
class _Column:
    """A device group: ``(type index, samples)`` per member, samples summing to the microbatch."""

    members: tuple[tuple[int, int], ...]


def _device_types(devices: Sequence[DeviceProfile], network: Network) -> list[_Type]:
    """Devices with the same figures form a type. With per-pair links they must also be
    interchangeable on the network: the same link to every other device, and one link figure
    between any two of them."""
    groups: dict[tuple[float, ...], list[DeviceProfile]] = {}
    for d in devices:
        key = (
            d.gflops,
            float(d.memory_bytes),
            d.power_idle_w,
            d.power_active_w,
            d.power_tx_w,
            d.battery_wh,
        )
        groups.setdefault(key, []).append(d)
    ordered = [sorted(g, key=lambda d: d.node_id) for g in groups.values()]
    if network.kind != "links":
        return [_Type(tuple(g)) for g in ordered]
    types: list[_Type] = []
    for group in ordered:
        found: list[list[DeviceProfile]] = []
        for d in group:
            for members in found:
                if _interchangeable(d, members, devices, network):
                    members.append(d)
                    break
            else:
                found.append([d])
        types.extend(_Type(tuple(m)) for m in found)
    return types


def _interchangeable(
    d: DeviceProfile,
    members: Sequence[DeviceProfile],
    devices: Sequence[DeviceProfile],
    network: Network,
) -> bool:
    head = members[0]
    inner = network.link(head.node_id, d.node_id)
    if inner[0] <= 0 or not math.isfinite(inner[1]):
        return False
    if len(members) > 1 and network.link(head.node_id, members[1].node_id) != inner:
        return False
    if any(network.link(m.node_id, d.node_id) != inner for m in members):
        return False
    inside = {m.node_id for m in members} | {d.node_id}
    return all(
        network.link(d.node_id, f.node_id) == network.link(head.node_id, f.node_id)
        for f in devices
        if f.node_id not in inside
    )


def narrow(
    devices: Sequence[DeviceProfile],
    network: Network,
    limit: int = MAX_TYPES,
    *,
    keep: Sequence[NodeId] = (),
) -> tuple[DeviceProfile, ...]:
    """At most ``limit`` device types, taken in turn from the fastest, the most frugal per
    GFLOP, the lowest idle draw and the largest memory, always with the devices in ``keep``.

    The program's size grows with the types (and, with per-pair links, with their square); on a
    big fleet of distinct devices the ones no ranking puts near the top rarely matter.
    """
    types = _device_types(devices, network)
    if len(types) <= limit:
        return tuple(devices)
    wanted = set(keep)
    chosen = [t for t, ty in enumerate(types) if any(d.node_id in wanted for d in ty.devices)]
    rankings = [
        sorted(range(len(types)), key=lambda t: -types[t].head.gflops),
        sorted(
            range(len(types)),
            key=lambda t: (
                (types[t].head.power_active_w - types[t].head.power_idle_w) / types[t].head.gflops
            ),
        ),
        sorted(range(len(types)), key=lambda t: types[t].head.power_idle_w),
        sorted(range(len(types)), key=lambda t: -types[t].head.memory_bytes),
    ]
    for rank in itertools.chain.from_iterable(zip(*rankings, strict=True)):
        if len(chosen) >= max(limit, len(set(chosen))):
            break
        if rank not in chosen:
            chosen.append(rank)
    picked = {d.node_id for t in chosen for d in types[t].devices}
    return tuple(d for d in devices if d.node_id in picked)


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write ``total`` as ``parts`` positive integers, in order."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        edges = (0, *cuts, total)
        yield tuple(edges[k + 1] - edges[k] for k in range(parts))


def device_groups(
    devices: Sequence[DeviceProfile], network: Network
) -> list[tuple[DeviceProfile, ...]]:
    """Interchangeable devices, grouped (see ``_device_types``): searches need only try one
    device of each group."""
    return [ty.devices for ty in _device_types(devices, network)]


def balanced_split(speeds: Sequence[float], total: int) -> tuple[int, ...]:
    """Whole samples per member (each at least one) that minimise the slowest member's time."""
    return _balanced_split(speeds, total)


def _balanced_split(speeds: Sequence[float], total: int) -> tuple[int, ...]:
    """Whole samples (each >= 1) minimising the slowest member's time: greedy, which is exact
    for this min-max problem."""
    counts = [1] * len(speeds)
    for _ in range(total - len(speeds)):
        k = min(range(len(speeds)), key=lambda i: ((counts[i] + 1) / speeds[i], i))
        counts[k] += 1
    return tuple(counts)


def _splits(types: Sequence[_Type], combo: Sequence[int], microbatch: int) -> list[tuple[int, ...]]:
    """Whole-sample splits of a group: all of them while there are at most
    ``MAX_SPLITS_PER_GROUP`` (which keeps small instances exact), else the fastest split, the
    most frugal one and the fastest with one sample moved between two members."""
    size = len(combo)
    if math.comb(microbatch - 1, size - 1) <= MAX_SPLITS_PER_GROUP:
        return list(_compositions(microbatch, size))
    heads = [types[t].head for t in combo]
    fast = _balanced_split([d.gflops for d in heads], microbatch)
    out = {fast: None}
    dyn = [(d.power_active_w - d.power_idle_w) / d.gflops for d in heads]
    frugal = [1] * size
    frugal[min(range(size), key=lambda i: dyn[i])] += microbatch - size
    out[tuple(frugal)] = None
    for i, j in itertools.permutations(range(size), 2):
        if fast[i] > 1:
            moved = list(fast)
            moved[i] -= 1
            moved[j] += 1
            out[tuple(moved)] = None
    return list(out)


def _columns(types: Sequence[_Type], microbatch: int, *, exhaustive: bool) -> list[_Column]:
    """Candidate groups: every one (small fleets), or singletons, groups of one type, and mixed
    groups of the fastest and the most frugal types (larger fleets)."""
    out: dict[tuple[tuple[int, int], ...], None] = {}

    def add(members: Sequence[tuple[int, int]]) -> None:
        out.setdefault(tuple(sorted(members)), None)

    for t in range(len(types)):
        add([(t, microbatch)])
    if microbatch < 2:
        return [_Column(m) for m in out]
    slots = [t for t, ty in enumerate(types) for _ in range(ty.count)]
    if exhaustive:
        for size in range(2, min(len(slots), microbatch) + 1):
            for combo in sorted(set(itertools.combinations(slots, size))):
                for split in _splits(types, combo, microbatch):
                    add(list(zip(combo, split, strict=True)))
                    if len(out) >= MAX_COLUMNS:
                        return [_Column(m) for m in out]
        return [_Column(m) for m in out]
    # Groups of one type: the cheapest way to add replicas on fleets of a few device classes.
    for t, ty in enumerate(types):
        for size in range(2, min(ty.count, microbatch, MAX_GROUP) + 1):
            split = _balanced_split([ty.head.gflops] * size, microbatch)
            add([(t, n) for n in split])
    # Mixed groups among the fastest and the most frugal types, split for speed and for energy.
    fast = sorted(range(len(types)), key=lambda t: -types[t].head.gflops)[:6]
    frugal = sorted(
        range(len(types)),
        key=lambda t: (
            (types[t].head.power_active_w - types[t].head.power_idle_w) / types[t].head.gflops
        ),
    )[:4]
    pool = list(dict.fromkeys(fast + frugal))
    for size in (2, 3):
        if size > microbatch:
            break
        for combo in itertools.combinations(pool, size):
            speeds = [types[t].head.gflops for t in combo]
            add(list(zip(combo, _balanced_split(speeds, microbatch), strict=True)))
            dyn = [
                (types[t].head.power_active_w - types[t].head.power_idle_w) / types[t].head.gflops
                for t in combo
            ]
            cheapest = min(range(size), key=lambda i: dyn[i])
            frugal_split = [1] * size
            frugal_split[cheapest] += microbatch - size
            add(list(zip(combo, frugal_split, strict=True)))
            if len(out) >= MAX_COLUMNS:
                return [_Column(m) for m in out]
    return [_Column(m) for m in out]


# ---------------------------------------------------------------------------------------------
# Problem data over blocks


def _memory_parts(
    table: LayerTable, co: coarsen.Coarsening, kind: str
) -> tuple[FloatArray, FloatArray]:
    """``fixed[i, j] + var[i, j] * samples`` = ``cost.stage_memory_bytes`` of blocks ``i..j``."""
    n = len(table.layers)
    k = len(co.blocks)
    inflight = cost.inflight_microbatches("training" if kind == "training" else "inference")
    params = np.array([float(layer.param_bytes) for layer in table.layers])
    act = np.array([float(layer.activation_bytes) for layer in table.layers])
    work = np.array([float(layer.workspace_bytes) for layer in table.layers])
    inputs = np.array([float(cost.input_bytes_of(table, i)) for i in range(n)])
    pp = np.concatenate([[0.0], np.cumsum(params)])
    ends = np.array([last for _, last in co.blocks])
    fixed = np.full((k, k), _INF)
    var = np.full((k, k), _INF)
    for bi, (first, _) in enumerate(co.blocks):
        js = ends[bi:]
        if kind == "training":
            ip = np.concatenate([[0.0], np.cumsum(inputs[first:])])
            ws = np.maximum.accumulate(work[first:])
            kept = ip[js - first + 1] + act[js]
            fixed[bi, bi:] = (pp[js + 1] - pp[first]) * cost.TRAINING_STATE_FACTOR
            var[bi, bi:] = (kept + ws[js - first]) * inflight
        else:
            peak = np.maximum.accumulate(inputs[first:] + act[first:] + work[first:])
            fixed[bi, bi:] = pp[js + 1] - pp[first]
            var[bi, bi:] = peak[js - first] * inflight
    return fixed, var


@dataclass(slots=True)
class _Data:
    """Everything the program needs, per block and per column, in ms / mJ / bytes."""

    devices: tuple[DeviceProfile, ...]
    types: list[_Type]
    columns: list[_Column]
    co: coarsen.Coarsening
    table: LayerTable
    network: Network
    workload: Workload
    m: int
    dirs: int
    shared: bool
    f: FloatArray  # per-sample GFLOP per block
    p: FloatArray  # parameter bytes per block
    cut_wire: FloatArray  # ms on the wire for a cut after block j (shared medium), one way
    cut_bits: FloatArray  # Mbit crossing a cut after block j (links: times omega = 1/Mbps)
    cut_lat: FloatArray  # ms of path latency of a cut after block j (shared medium)
    cut_nonzero: FloatArray  # 1 where the cut carries bytes (a latency is only paid then)
    lo: IntArray  # (C, K) first start block that fits when the stage ends at block j
    count: IntArray  # (C, T) members of each type
    kappa: FloatArray  # ms per per-sample GFLOP of the stage
    delta: FloatArray  # mJ per per-sample GFLOP (active minus idle)
    idle: FloatArray  # W of idle draw
    txs: FloatArray  # W of transmit draw per ms of cut wire time (sum tx_d * share_d)
    swire: FloatArray  # ms of all-reduce wire time per parameter byte (sum on a shared medium)
    slat: FloatArray  # ms of all-reduce latency
    sring: FloatArray  # ms per parameter byte on the busiest ring link (links)
    stx: FloatArray  # mJ per parameter byte of all-reduce transmit energy
    battery_rows: list[tuple[int, float, float, float, float, float]] = field(default_factory=list)
    """(column, dyn mJ/GFLOP, tx W of cut share, sync mJ/byte, budget - idle W, share)."""


def _prepare(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    co: coarsen.Coarsening,
    *,
    battery_hours: float | None,
    exhaustive: bool | None,
    include: Sequence[StagePlan] = (),
) -> _Data:
    """The program's data; ``include``'s groups become columns too (a warm start's)."""
    devices = tuple(devices)
    types = _device_types(devices, network)
    if len(types) > MAX_TYPES:
        raise ValueError(f"at most {MAX_TYPES} device types; narrow the fleet first")
    m = workload.batch
    dirs = cost.direction_factor(workload.kind)
    shared = network.kind == "shared"
    if exhaustive is None:
        exhaustive = len(devices) <= EXHAUSTIVE_DEVICES
    columns = _columns(types, m, exhaustive=exhaustive)
    type_of = {dev.node_id: t for t, ty in enumerate(types) for dev in ty.devices}
    known = {col.members for col in columns}
    for stage in include:
        members = tuple(
            sorted(
                (type_of[mm.id], round(mm.share * m)) for mm in stage.devices if mm.id in type_of
            )
        )
        if len(members) == len(stage.devices) and members not in known:
            known.add(members)
            columns.append(_Column(members))

    gfl = cost.layer_gflops(table, workload.kind)
    k = len(co.blocks)
    f = np.array([sum(gfl[a : b + 1]) for a, b in co.blocks])
    p = np.array(
        [float(sum(table.layers[i].param_bytes for i in range(a, b + 1))) for a, b in co.blocks]
    )
    act = np.array([float(table.layers[b].activation_bytes) for _, b in co.blocks])
    act[-1] = 0.0  # the model's output is not a cut
    cut_bits = act * m * 8.0 / 1e6
    if shared:
        cut_wire = cut_bits / network.bandwidth_mbps * _MS
        cut_lat = np.where(act > 0, network.latency_ms, 0.0)
    else:
        cut_wire = np.zeros(k)
        cut_lat = np.zeros(k)
    cut_nonzero = (act > 0).astype(np.float64)

    fixed, var = _memory_parts(table, co, workload.kind)
    lo_cache: dict[tuple[int, int], IntArray] = {}
    idx = np.arange(k)

    def lo_of(t: int, n: int) -> IntArray:
        key = (t, n)
        if key not in lo_cache:
            need = fixed + var * n
            ok = need <= types[t].head.memory_bytes
            # A stage ending at j fits from a suffix of starts: count them.
            lo_cache[key] = (idx + 1 - ok.sum(axis=0)).astype(np.int64)
        return lo_cache[key]

    n_cols = len(columns)
    lo = np.zeros((n_cols, k), dtype=np.int64)
    count = np.zeros((n_cols, len(types)), dtype=np.int64)
    kappa = np.zeros(n_cols)
    delta = np.zeros(n_cols)
    idle = np.zeros(n_cols)
    txs = np.zeros(n_cols)
    swire = np.zeros(n_cols)
    slat = np.zeros(n_cols)
    sring = np.zeros(n_cols)
    stx = np.zeros(n_cols)
    keep = np.ones(n_cols, dtype=bool)
    battery_rows: list[tuple[int, float, float, float, float, float]] = []
    for c, col in enumerate(columns):
        size = len(col.members)
        ring: list[DeviceProfile] = []
        per_type_used: dict[int, int] = {}
        for t, n in col.members:
            lo[c] = np.maximum(lo[c], lo_of(t, n))
            count[c, t] += 1
            used = per_type_used.get(t, 0)
            per_type_used[t] = used + 1
            d = types[t].devices[min(used, types[t].count - 1)]
            ring.append(d)
            kappa[c] = max(kappa[c], n / d.gflops * _MS)
            delta[c] += (d.power_active_w - d.power_idle_w) * n / d.gflops * _MJ
            idle[c] += d.power_idle_w
            txs[c] += d.power_tx_w * n / m
        if (count[c] > [ty.count for ty in types]).any():
            keep[c] = False
            continue
        sync_tx_per_byte = [0.0] * size
        if workload.kind == "training" and size >= 2:
            wires: list[float] = []
            lats: list[float] = []
            for i, src in enumerate(ring):
                bw, lat_ms = network.link(src.node_id, ring[(i + 1) % size].node_id)
                if bw <= 0:
                    keep[c] = False
                    break
                w = 2.0 * (size - 1) / size * 8.0 / (bw * 1e6) * _MS  # ms per parameter byte
                wires.append(w)
                lats.append(lat_ms)
                sync_tx_per_byte[i] = src.power_tx_w * w  # mJ per byte (W * ms)
            if not keep[c]:
                continue
            swire[c] = sum(wires) if shared else max(wires)
            sring[c] = max(wires)
            slat[c] = 2 * (size - 1) * max(lats)
            stx[c] = sum(sync_tx_per_byte)
        if battery_hours is not None:
            for i, (_, n) in enumerate(col.members):
                d = ring[i]
                if d.battery_wh <= 0:
                    continue
                budget = d.battery_wh / battery_hours
                if budget < d.power_idle_w:
                    keep[c] = False
                    break
                battery_rows.append(
                    (
                        c,
                        (d.power_active_w - d.power_idle_w) * n / d.gflops * _MJ,
                        d.power_tx_w * n / m,
                        sync_tx_per_byte[i],
                        budget - d.power_idle_w,
                        n / m,
                    )
                )
        if (lo[c] > idx).all():
            keep[c] = False  # fits no stage at all
    if not keep.all():
        remap = np.cumsum(keep) - 1
        battery_rows = [(int(remap[r[0]]), *r[1:]) for r in battery_rows if keep[r[0]]]
        columns = [col for col, ok in zip(columns, keep, strict=True) if ok]
        lo, count, kappa, delta, idle = lo[keep], count[keep], kappa[keep], delta[keep], idle[keep]
        txs, swire, slat, sring, stx = txs[keep], swire[keep], slat[keep], sring[keep], stx[keep]
    return _Data(
        devices=devices,
        types=types,
        columns=columns,
        co=co,
        table=table,
        network=network,
        workload=workload,
        m=m,
        dirs=dirs,
        shared=shared,
        f=f,
        p=p,
        cut_wire=cut_wire,
        cut_bits=cut_bits,
        cut_lat=cut_lat,
        cut_nonzero=cut_nonzero,
        lo=lo,
        count=count,
        kappa=kappa,
        delta=delta,
        idle=idle,
        txs=txs,
        swire=swire,
        slat=slat,
        sring=sring,
        stx=stx,
        battery_rows=battery_rows,
    )


# ---------------------------------------------------------------------------------------------
# The program


@dataclass(frozen=True, slots=True)
class MilpResult:
    """What the partitioner found, and how sure it is."""

    plan: Plan | None
    plan_cost: cost.PlanCost | None
    status: str
    """HiGHS' model status (``kOptimal``, ``kTimeLimit``...) or why it did not run."""
    gap: float | None
    """Relative MIP gap HiGHS reports for its incumbent (0 = proven optimal; None = no run)."""
    seconds: float
    build_seconds: float
    columns: int
    stages: int
    warm_started: bool


@dataclass(slots=True)
class _Model:
    problem: Any
    z: Any
    a: Any
    steps: list[Callable[[], None]]
    """In dependency order, each sets one auxiliary variable's value from those before it, so
    a warm start's whole point follows from its binaries."""


def _build(
    d: _Data,
    objective: Objective,
    bounds: Bounds,
    n_stages: int,
    *,
    fixed_period_s: float | None,
    period_cap_s: float,
    energy_needed: bool,
) -> _Model:
    """The program (see the module docstring), disaggregated and vectorised.

    Every column-dependent term of a stage is written over per-column copies ``V[s, c]`` of the
    stage's linear quantity ``v_s`` (``0 <= V[s, c] <= cap_c * A[s, c]``, ``sum_c V[s, c] =
    v_s``), so that e.g. the compute time is the exact linear ``sum_c kappa_c * F[s, c]``
    rather than a big-M maximum: a much tighter relaxation, which is what makes HiGHS fast here.
    Constraints are whole matrices, not loops of scalars: CVXPY's compile time grows with the
    number of expression nodes, and it counts against the caller's time limit.
    """
    cp: Any = importlib.import_module("cvxpy")

    S, K, C = n_stages, len(d.co.blocks), len(d.columns)
    T = len(d.types)
    steps: list[Callable[[], None]] = []
    cons: list[Any] = []

    def col(v: Any, n: int) -> Any:
        return cp.reshape(v, (n, 1), order="F")

    def lower(var: Any, expr: Any) -> None:
        """``var >= expr``: a scalar against every element, or a vector (n,) against the rows
        of an (n, m) matrix; remembered for the warm start."""
        if var.ndim == 0 or getattr(expr, "ndim", 0) <= 1:
            cons.append(var >= expr)
        else:
            cons.append(col(var, var.shape[0]) >= expr)

        def step() -> None:
            value = np.asarray(expr.value if hasattr(expr, "value") else expr, dtype=np.float64)
            current = np.asarray(var.value, dtype=np.float64).reshape(var.shape)
            if var.ndim == 0:
                var.value = np.maximum(current, value.max(initial=0.0))
            elif value.ndim == 2:
                var.value = np.maximum(current, value.max(axis=1))
            else:
                var.value = np.maximum(current, value)

        steps.append(step)

    def split(name: str, total: Any, cap: FloatArray, cols: IntArray | None = None) -> Any:
        """Per-column copies of the per-stage quantity ``total`` (S,), over columns ``cols``."""
        idx = np.arange(C) if cols is None else cols
        var = cp.Variable((S, len(idx)), nonneg=True, name=name)
        sub = a if cols is None else a[:, idx]
        cons.append(var <= cp.multiply(np.broadcast_to(cap[idx], (S, len(idx))), sub))
        cons.append(cp.sum(var, axis=1) == total)

        def step() -> None:
            var.value = np.asarray(a.value)[:, idx] * np.asarray(total.value).reshape(S, 1)

        steps.append(step)
        return var

    z = cp.Variable((S, K), boolean=True, name="z")
    a = cp.Variable((S, C), boolean=True, name="a")
    zprev = cp.vstack([np.zeros((1, K)), z[:-1, :]]) if S > 1 else np.zeros((1, K))
    x = z - zprev
    u = cp.sum(a, axis=1)
    cons += [z[S - 1, :] == 1, z[0, 0] == 1, u[0] == 1]
    if K > 1:
        cons.append(z[:, :-1] >= z[:, 1:])
    if S > 1:
        cons += [z[:-1, :] <= z[1:, :], u[:-1] >= u[1:]]
    cons += [x <= col(u, S), cp.sum(x, axis=1) >= u]
    cons.append(cp.sum(a, axis=0) @ d.count <= np.array([ty.count for ty in d.types]))

    # Cuts: e[s, j] = 1 when stage s ends after block j and stage s + 1 follows.
    if K > 1:
        e = z[:, :-1] - z[:, 1:]  # (S, K-1)
        end = cp.hstack([e, col(z[:, K - 1] - zprev[:, K - 1], S)])
    else:
        e = None
        end = col(z[:, 0] - zprev[:, 0], S)
    start: Any = cp.sum(zprev, axis=1) if S > 1 else None
    flops = x @ d.f
    params = x @ d.p

    # Memory windows: a stage on column c ending at block j starts at lo_c[j] or later (lo =
    # j + 1: nothing fits). Columns sharing a window share one row (one column per stage);
    # windows that never bind (lo = 0) need none.
    windows: dict[tuple[int, ...], list[int]] = {}
    for c in range(C):
        if d.lo[c].any():
            windows.setdefault(tuple(int(v) for v in d.lo[c]), []).append(c)
    if windows:
        lo = np.array(list(windows), dtype=np.float64)  # (W, K)
        member = np.zeros((C, len(windows)))
        for w, cs in enumerate(windows.values()):
            member[cs, w] = 1.0
        first = cp.Variable(S, nonneg=True, name="first") if start is not None else None
        if first is not None:
            cons.append(first == start)
            steps.append(lambda: setattr(first, "value", np.asarray(start.value, dtype=float)))
        cons.append(
            end @ lo.T - K * (1 - a @ member) <= (col(first, S) if first is not None else 0.0)
        )

    # The most FLOPs (parameter bytes) a stage on each column can hold, from its windows.
    fp = np.concatenate([[0.0], np.cumsum(d.f)])
    pp = np.concatenate([[0.0], np.cumsum(d.p)])
    fits = d.lo <= np.arange(K)[None, :]
    lo_safe = np.minimum(d.lo, K)
    f_cap = np.where(fits, fp[None, 1:] - fp[lo_safe], 0.0).max(axis=1)
    p_cap = np.where(fits, pp[None, 1:] - pp[lo_safe], 0.0).max(axis=1)

    f_col = split("f_col", flops, f_cap)
    tau = f_col @ d.kappa  # (S,) ms: exact, one column per stage

    # Cuts' wire time (one way) and path latency, per boundary s = 0..S-2.
    cut_ms: Any = None
    cut_lat: Any = None
    net_terms: list[Any] = []  # links: every element bounds the network term
    if e is not None and S > 1:
        if d.shared:
            cut_ms = e[:-1, :] @ d.cut_wire[:-1]
            cut_lat = e[:-1, :] @ d.cut_lat[:-1]
        else:
            # present[s, t] = 1 when stage s uses a device of type t (one column per stage).
            y = cp.Variable((S, T), nonneg=True, name="present")
            cons.append(y == a @ (d.count > 0).astype(np.float64))
            steps.append(
                lambda: setattr(y, "value", np.asarray(a.value) @ (d.count > 0).astype(float))
            )
            bw = np.zeros((T, T))
            lat = np.zeros((T, T))
            for i, ti in enumerate(d.types):
                for j, tj in enumerate(d.types):
                    if i != j:
                        bw[i, j], lat[i, j] = d.network.link(ti.head.node_id, tj.head.node_id)
                    elif ti.count > 1:  # two devices of one type: their (common) link
                        bw[i, j], lat[i, j] = d.network.link(
                            ti.devices[0].node_id, ti.devices[1].node_id
                        )
            linked = (bw > 0) & np.isfinite(lat)
            inv_bw = np.where(linked, 1.0 / np.where(linked, bw, 1.0), 0.0)
            lat_ms = np.where(linked, lat, 0.0)
            omega_max = float(inv_bw.max()) if linked.any() else 0.0
            lat_max = float(lat_ms.max()) if linked.any() else 0.0
            missing = ~linked
            for t, ty in enumerate(d.types):
                if ty.count == 1:
                    missing[t, t] = False  # a single-device type cannot face itself
            rows, cols = np.nonzero(linked)
            m_rows, m_cols = np.nonzero(missing)
            if len(m_rows):
                cons.append(y[:-1, :][:, m_rows] + y[1:, :][:, m_cols] <= 1)
            omega = cp.Variable(S - 1, nonneg=True, name="omega")
            lam = cp.Variable(S - 1, nonneg=True, name="lam")
            if len(rows):
                both = y[:-1, :][:, rows] + y[1:, :][:, cols] - 1  # (S-1, pairs)
                lower(omega, cp.multiply(np.broadcast_to(inv_bw[rows, cols], both.shape), both))
                lower(lam, cp.multiply(np.broadcast_to(lat_ms[rows, cols], both.shape), both))
            bits = d.cut_bits[:-1] * _MS  # ms per (1/Mbps)
            wire_l = cp.Variable(S - 1, nonneg=True, name="wire_l")
            lat_l = cp.Variable(S - 1, nonneg=True, name="lat_l")
            lower(
                wire_l,
                cp.multiply(
                    np.broadcast_to(bits, (S - 1, K - 1)),
                    col(omega, S - 1) - omega_max * (1 - e[:-1, :]),
                ),
            )
            lower(lat_l, lam - lat_max * (1 - e[:-1, :] @ d.cut_nonzero[:-1]))
            cut_ms, cut_lat = wire_l, lat_l
            net_terms.append(wire_l)

    # Training: all-reduce inside groups.
    sync_lat: Any = 0.0
    sync_wire: Any = None
    p_col = None
    if d.workload.kind == "training" and (d.swire > 0).any():
        p_col = split("p_col", params, p_cap)
        sync_wire = p_col @ d.swire  # (S,)
        sync_lat = cp.sum(a @ d.slat)
        if not d.shared:
            net_terms.append(p_col @ d.sring)

    latency = cp.sum(tau) + sync_lat
    if cut_ms is not None:
        latency = latency + d.dirs * (cp.sum(cut_ms) + cp.sum(cut_lat))
    if sync_wire is not None:
        latency = latency + cp.sum(sync_wire)

    bottleneck = cp.Variable(nonneg=True, name="bottleneck")
    lower(bottleneck, tau)
    network_ms: Any = None
    if d.shared:
        if cut_ms is not None:
            network_ms = d.dirs * cp.sum(cut_ms)
        if sync_wire is not None:
            network_ms = cp.sum(sync_wire) + (network_ms if network_ms is not None else 0.0)
        if network_ms is not None:
            lower(bottleneck, network_ms)
    else:
        for term in net_terms:
            lower(bottleneck, term)
    if d.workload.kind == "training":
        # A step is synchronous (cost.py): the next one starts when this one ends.
        lower(bottleneck, latency)
    cons.append(bottleneck >= cost.MIN_BOTTLENECK_S * _MS)

    # Energy per microbatch (mJ), and battery budgets.
    energy: Any = None
    if energy_needed:
        if fixed_period_s is not None:
            period: Any = fixed_period_s * _MS
            period_col: Any = a * period  # (S, C) ms
        else:
            period = cp.Variable(nonneg=True, name="period")
            lower(period, bottleneck)
            if d.workload.rate_rps > 0:
                lower(period, 1.0 / d.workload.rate_rps * _MS)
            p_max = period_cap_s * _MS
            cons.append(period <= p_max)
            # period * u[s], linearised: minimisation keeps it at its lower bound.
            period_used = cp.Variable(S, nonneg=True, name="period_used")
            lower(period_used, period - p_max * (1 - u))
            period_col = split("period_col", period_used, np.full(C, p_max))
            # Valid cuts that tighten the relaxation: a stage's devices stay awake at least
            # for their own compute time and for the request period.
            cons.append(period_col >= cp.multiply(f_col, np.broadcast_to(d.kappa, (S, C))))
            if d.workload.rate_rps > 0:
                cons.append(period_col >= a * (1.0 / d.workload.rate_rps * _MS))
        energy = cp.sum(period_col @ d.idle) + cp.sum(f_col @ d.delta)
        w_col = None
        if cut_ms is not None:
            # What each stage's devices send: its outgoing cut, and for training the gradient
            # back over its incoming cut.
            route = np.zeros((S, S - 1))
            route[np.arange(S - 1), np.arange(S - 1)] = 1.0
            if d.dirs == 2:
                route[np.arange(1, S), np.arange(S - 1)] = 1.0
            sent = route @ cut_ms
            w_col = split("w_col", sent, np.full(C, 2.0 * _max_cut_ms(d)))
            energy = energy + cp.sum(w_col @ d.txs)
        if p_col is not None:
            energy = energy + cp.sum(p_col @ d.stx)
        if d.battery_rows:
            # Per battery-powered member: dynamic + transmit energy <= (budget - idle) * period.
            # The period must be the true one, max(bottleneck, 1 / rate); the ``period``
            # variable is only bounded below (inflating it would fake headroom), so a variable
            # ``q`` picks one of the exact terms (binary ``pick``) and is never above the true
            # period: sound, and exact whenever an exact term sets the period (always on a
            # shared medium).
            if fixed_period_s is not None:
                q: Any = fixed_period_s * _MS
            else:
                terms = [tau]
                if d.workload.kind == "training":
                    terms.append(cp.reshape(latency, (1,), order="F"))
                if d.workload.rate_rps > 0:
                    terms.append(cp.Constant(np.array([1.0 / d.workload.rate_rps * _MS])))
                if d.shared and network_ms is not None:
                    terms.append(cp.reshape(network_ms, (1,), order="F"))
                stacked = cp.hstack(terms)
                n_terms = stacked.shape[0]
                pick = cp.Variable(n_terms, boolean=True, name="pick")
                q = cp.Variable(nonneg=True, name="q")
                big = period_cap_s * _MS
                cons += [cp.sum(pick) == 1, q <= stacked + big * (1 - pick)]

                def pick_step() -> None:
                    values = np.asarray(stacked.value, dtype=np.float64)
                    chosen = np.zeros(n_terms)
                    chosen[int(np.argmax(values))] = 1.0
                    pick.value = chosen
                    q.value = np.asarray(float(values.max()))

                steps.append(pick_step)
            rows_c = np.array([r[0] for r in d.battery_rows])

            def per_row(k: int) -> FloatArray:
                # Broadcast here: CVXPY's C++ backend has no broadcast atom of its own.
                row = np.array([r[k] for r in d.battery_rows])
                return np.broadcast_to(row, (S, len(rows_c)))

            use = cp.multiply(f_col[:, rows_c], per_row(1))
            if w_col is not None:
                use = use + cp.multiply(w_col[:, rows_c], per_row(2))
            if p_col is not None:
                use = use + cp.multiply(p_col[:, rows_c], per_row(3))
            # A member of an unused column uses nothing, so no big-M is needed.
            headroom = np.broadcast_to(np.array([r[4] for r in d.battery_rows]), (S, len(rows_c)))
            cons.append(
                use <= cp.multiply(headroom, q) if not isinstance(q, float) else use <= headroom * q
            )

    # QoE bounds.
    if math.isfinite(bounds.latency_s):
        cons.append(latency <= bounds.latency_s * _MS * (1 + BOUND_SLACK))
    if math.isfinite(bounds.bottleneck_s):
        cons.append(bottleneck <= bounds.bottleneck_s * _MS * (1 + BOUND_SLACK))
    if math.isfinite(bounds.energy_j):
        if energy is None:
            raise AssertionError("an energy bound needs the energy terms")
        cons.append(energy <= bounds.energy_j * _MJ * (1 + BOUND_SLACK))

    if objective == "min_latency":
        goal = latency
    elif objective == "max_throughput":
        goal = bottleneck
    else:
        if energy is None:
            raise AssertionError("min_energy needs the energy terms")
        goal = energy
    problem = cp.Problem(cp.Minimize(goal), cons)
    return _Model(problem=problem, z=z, a=a, steps=steps)


def _warm_values(model: _Model, z0: FloatArray, a0: FloatArray) -> None:
    """Set every variable's value for the point with binaries ``z0, a0``."""
    model.z.value = z0
    model.a.value = a0
    for var in model.problem.variables():
        if var is not model.z and var is not model.a:
            var.value = np.zeros(var.shape)
    for step in model.steps:
        step()


class _CompileClock:
    """How long CVXPY takes to compile a program here: seconds per unit of program size (see
    ``COMPILE_UNIT_VARIABLES``), from the recent compiles of this process. Before the first one
    nothing is known and the estimate is zero: the first compile measures (and the caller's
    deadline still holds, see ``solve``)."""

    def __init__(self) -> None:
        self._rates: deque[float] = deque(maxlen=COMPILE_SAMPLES)
        self._lock = threading.Lock()

    @staticmethod
    def size(problem: Any) -> float:
        return 1.0 + float(sum(v.size for v in problem.variables())) / COMPILE_UNIT_VARIABLES

    def observe(self, size: float, seconds: float) -> None:
        with self._lock:
            self._rates.append(seconds / size)

    def estimate(self, size: float) -> float:
        with self._lock:
            worst = max(self._rates, default=0.0)
        return COMPILE_SAFETY * worst * size


_COMPILE_CLOCK = _CompileClock()
#: One program is built, compiled or solved at a time (see the module docstring).
_IN_FLIGHT = threading.Lock()


def _highs_budget(left: float) -> float:
    """HiGHS' own time limit with ``left`` seconds to the deadline: the rest covers HiGHS'
    overrun of its limit, reading the answer back and checking it."""
    return left - max(0.1, 0.25 * left)


def _solve_highs(
    model: _Model, deadline: float, mip_gap: float, warm: bool
) -> tuple[str, float | None, bool]:
    """Compile the program with CVXPY and run HiGHS on its problem data (so a MIP start can be
    passed); returns (model status, relative gap, whether the start was accepted as a point).
    ``no-time``: the compile's estimate and a minimal solve do not fit before ``deadline``;
    ``not-run``: the compile overran its estimate and left HiGHS no time."""
    cp: Any = importlib.import_module("cvxpy")
    highspy: Any = importlib.import_module("highspy")
    settings: Any = importlib.import_module("cvxpy.settings")

    problem = model.problem
    size = _COMPILE_CLOCK.size(problem)
    expected = _COMPILE_CLOCK.estimate(size)
    if _highs_budget(deadline - time.perf_counter() - expected) < HIGHS_MIN_SECONDS:
        return "no-time", None, False
    compile_started = time.perf_counter()
    try:
        data, chain, inverse = problem.get_problem_data(cp.HIGHS, canon_backend=CANON_BACKEND)
    except ValueError as err:
        # CVXPY refuses up front (before any work) an atom the C++ backend lacks; the program
        # is written without such atoms, so this only guards against a change that adds one.
        _log.warning("compiling with the COO backend", reason=str(err))
        data, chain, inverse = problem.get_problem_data(cp.HIGHS, canon_backend="COO")
    compiled = time.perf_counter() - compile_started
    _COMPILE_CLOCK.observe(size, compiled)
    if compiled > expected > 0:
        _log.debug("compile overran its estimate", seconds=round(compiled, 3), expected=expected)
    cache: dict[str, Any] = {}
    if warm:
        x0 = np.zeros(data["A"].shape[1])
        columns = data[settings.PARAM_PROB].var_id_to_col
        for var in problem.variables():
            if var.value is None or var.id not in columns:
                warm = False
                break
            col = columns[var.id]
            flat = np.asarray(var.value, dtype=np.float64).flatten(order="F")
            x0[col : col + flat.size] = flat
        if warm:
            solution = highspy.HighsSolution()
            solution.col_value = list(x0)
            solution.value_valid = True
            cache[chain.solver.name()] = (
                None,
                None,
                {"solution": solution, "model_status": "kOptimal"},
            )
    budget = _highs_budget(deadline - time.perf_counter())
    if budget < HIGHS_MIN_SECONDS:
        return "not-run", None, False
    options = {
        "time_limit": budget,
        "mip_rel_gap": mip_gap,
        "random_seed": 0,
        # Probing in presolve can take the whole time limit on these models and rarely pays.
        "presolve_rule_off": 1 << 15,
        **_EXTRA_OPTIONS,
    }
    raw = chain.solver.solve_via_data(data, bool(cache), _VERBOSE, options, solver_cache=cache)
    with warnings.catch_warnings():
        # A time-limited MIP's incumbent is reported as "may be inaccurate"; it is re-priced
        # and checked against the cost model anyway.
        warnings.simplefilter("ignore")
        problem.unpack_results(raw, chain, inverse)
    info = raw["info"]
    gap: float | None = None
    if raw["model_status"] in ("kOptimal", "kTimeLimit", "kSolutionLimit", "kInterrupt"):
        gap = float(info.mip_gap) if math.isfinite(info.mip_gap) else None
        if raw["model_status"] == "kOptimal":
            gap = max(0.0, gap or 0.0)
    return str(raw["model_status"]), gap, warm


def _decode(d: _Data, model: _Model) -> tuple[StagePlan, ...] | None:
    """Stages over layers from the program's binaries, with concrete devices per type."""
    if model.z.value is None or model.a.value is None:
        return None
    z = np.rint(np.asarray(model.z.value)).astype(np.int64)
    a = np.rint(np.asarray(model.a.value)).astype(np.int64)
    S, K = z.shape
    used = {t: 0 for t in range(len(d.types))}
    stages: list[StagePlan] = []
    prev = np.zeros(K, dtype=np.int64)
    for s in range(S):
        blocks = np.nonzero(z[s] - prev)[0]
        prev = z[s]
        cols = np.nonzero(a[s])[0]
        if len(blocks) == 0 and len(cols) == 0:
            continue
        if len(blocks) == 0 or len(cols) != 1:
            return None
        col = d.columns[int(cols[0])]
        members: list[DeviceShare] = []
        for t, n in col.members:
            if used[t] >= d.types[t].count:
                return None
            device = d.types[t].devices[used[t]]
            used[t] += 1
            members.append(DeviceShare(device.node_id, n / d.m))
        first, last = d.co.layer_range(int(blocks[0]), int(blocks[-1]))
        stages.append(StagePlan(first, last, tuple(members)))
    return tuple(stages)


def _encode(
    d: _Data, stages: Sequence[StagePlan], n_stages: int
) -> tuple[FloatArray, FloatArray] | None:
    """Binaries ``(z, a)`` of a block-aligned plan whose groups are columns (the warm start)."""
    blocks = d.co.contract(stages)
    if blocks is None or len(blocks) > n_stages:
        return None
    K = len(d.co.blocks)
    type_of = {dev.node_id: t for t, ty in enumerate(d.types) for dev in ty.devices}
    index = {col.members: c for c, col in enumerate(d.columns)}
    z = np.zeros((n_stages, K))
    a = np.zeros((n_stages, len(d.columns)))
    for s in range(n_stages):
        if s < len(blocks):
            z[s, : blocks[s].last + 1] = 1.0
            members = []
            for m in blocks[s].devices:
                n = round(m.share * d.m)
                if m.id not in type_of or abs(n - m.share * d.m) > 1e-9 or n < 1:
                    return None
                members.append((type_of[m.id], n))
            c = index.get(tuple(sorted(members)))
            if c is None:
                return None
            a[s, c] = 1.0
        else:
            z[s, :] = 1.0
    return z, a


def solve(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    bounds: Bounds | None = None,
    coarsening: coarsen.Coarsening | None = None,
    warm_start: Sequence[StagePlan] | None = None,
    time_limit_s: float = 5.0,
    max_stages: int = DEFAULT_MAX_STAGES,
    battery_hours: float | None = None,
    mip_gap: float = DEFAULT_MIP_GAP,
    exhaustive: bool | None = None,
    incumbent_energy_j: float | None = None,
) -> MilpResult:
    """The best hybrid plan the program finds within ``time_limit_s`` (everything included:
    the call returns by then, see the module docstring).

    ``bounds`` defaults to the QoE's; a caller may tighten the bottleneck (e.g. to keep up with
    the request rate). ``warm_start`` is a block-aligned plan (layer indices) used as the MIP
    start; whatever HiGHS returns is checked against the cost model, and the warm start is
    returned instead when it is better (or when HiGHS returns nothing). ``incumbent_energy_j``
    (min_energy) bounds the period the program must consider. Status ``busy``: an abandoned
    program was still compiling; ``abandoned``: this one did not finish in time.
    """
    started = time.perf_counter()
    deadline = started + time_limit_s
    network = indexed(network)
    co = coarsening or coarsen.identity(len(table.layers), table)
    keep = [m.id for s in warm_start or () for m in s.devices]
    devices = narrow(devices, network, keep=keep)
    bounds = bounds or Bounds.of(qoe, workload.batch)
    warm_stages = tuple(warm_start) if warm_start is not None else None
    warm_cost = (
        valid_plan(warm_stages, devices, table, network, workload, bounds, battery_hours)
        if warm_stages is not None
        else None
    )
    attempt = _Attempt()
    if deadline - time.perf_counter() <= HIGHS_MIN_SECONDS:
        attempt.status = "no-time"
    elif not _IN_FLIGHT.acquire(blocking=False):
        attempt.status = "busy"
    else:

        def work() -> None:
            try:
                _attempt(
                    attempt,
                    devices,
                    table,
                    network,
                    workload,
                    qoe.objective,
                    bounds,
                    co,
                    deadline,
                    warm_stages if warm_cost is not None else None,
                    max_stages=max_stages,
                    battery_hours=battery_hours,
                    mip_gap=mip_gap,
                    exhaustive=exhaustive,
                    incumbent_energy_j=incumbent_energy_j,
                )
            except Exception as err:  # re-raised in the caller's thread below
                attempt.error = err
            finally:
                attempt.done = True
                _IN_FLIGHT.release()

        worker = threading.Thread(target=work, name="milp-solve", daemon=True)
        worker.start()
        worker.join(max(deadline - time.perf_counter(), 0.0))
        if not attempt.done:
            # The compile overran: it finishes on its own, finds no time left for HiGHS and
            # frees the slot; what it found is not waited for.
            _log.info("partitioner abandoned at its deadline", limit_s=round(time_limit_s, 3))
            attempt = _Attempt(status="abandoned")
        elif attempt.error is not None:
            raise attempt.error
    best, best_cost = attempt.found, attempt.found_cost
    if (
        warm_cost is not None
        and warm_stages is not None
        and (
            best_cost is None
            or objective_key(qoe.objective, warm_cost) < objective_key(qoe.objective, best_cost)
        )
    ):
        best, best_cost = warm_stages, warm_cost
    plan = make_plan(best, devices, table, network, workload) if best is not None else None
    seconds = time.perf_counter() - started
    _log.debug(
        "milp",
        status=attempt.status,
        gap=attempt.gap,
        columns=attempt.columns,
        stages=attempt.stages,
        blocks=len(co.blocks),
        warm=attempt.warm_used,
        seconds=round(seconds, 3),
        build=round(attempt.build_seconds, 3),
    )
    return MilpResult(
        plan,
        best_cost,
        attempt.status,
        attempt.gap,
        seconds,
        attempt.build_seconds,
        attempt.columns,
        attempt.stages,
        attempt.warm_used,
    )


@dataclass(slots=True)
class _Attempt:
    """What one run of the program found, filled in by the worker thread (read by the caller
    only once ``done``)."""

    status: str = "not-run"
    gap: float | None = None
    found: tuple[StagePlan, ...] | None = None
    found_cost: cost.PlanCost | None = None
    build_seconds: float = 0.0
    columns: int = 0
    stages: int = 0
    warm_used: bool = False
    done: bool = False
    error: Exception | None = None


def _attempt(
    out: _Attempt,
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    objective: Objective,
    bounds: Bounds,
    co: coarsen.Coarsening,
    deadline: float,
    warm_stages: tuple[StagePlan, ...] | None,
    *,
    max_stages: int,
    battery_hours: float | None,
    mip_gap: float,
    exhaustive: bool | None,
    incumbent_energy_j: float | None,
) -> None:
    """Build the program, compile it and solve it with HiGHS by ``deadline`` (``solve``'s
    worker; ``warm_stages`` is a valid plan or None)."""
    started = time.perf_counter()
    d = _prepare(
        devices,
        table,
        network,
        workload,
        co,
        battery_hours=battery_hours,
        exhaustive=exhaustive,
        include=warm_stages or (),
    )
    if not d.columns:
        out.status = "no-columns"
        return
    n_stages = max(1, min(max_stages, len(co.blocks), len(devices)))
    if warm_stages is not None:
        n_stages = max(n_stages, min(len(warm_stages), len(co.blocks)))
    out.columns, out.stages = len(d.columns), n_stages
    rate_period = 1.0 / workload.rate_rps if workload.rate_rps > 0 else 0.0
    fixed_period = rate_period if 0 < rate_period and bounds.bottleneck_s <= rate_period else None
    energy_needed = (
        objective == "min_energy" or math.isfinite(bounds.energy_j) or bool(d.battery_rows)
    )
    period_cap = _period_cap(d, bounds, n_stages, incumbent_energy_j, objective)
    model = _build(
        d,
        objective,
        bounds,
        n_stages,
        fixed_period_s=fixed_period,
        period_cap_s=period_cap,
        energy_needed=energy_needed,
    )
    warm = False
    if warm_stages is not None:
        encoded = _encode(d, warm_stages, n_stages)
        if encoded is not None:
            _warm_values(model, *encoded)
            warm = True
    out.build_seconds = time.perf_counter() - started
    out.status, out.gap, out.warm_used = _solve_highs(model, deadline, mip_gap, warm)
    if out.status in ("no-time", "not-run"):
        return
    found = _decode(d, model)
    if found:
        found_cost = valid_plan(found, devices, table, network, workload, bounds, battery_hours)
        if found_cost is not None:
            out.found, out.found_cost = found, found_cost


def _max_cut_ms(d: _Data) -> float:
    """The longest one-way wire time any cut can take (ms), a big-M for transmit terms."""
    if d.shared:
        return float(d.cut_wire.max())
    slowest = max(
        (1.0 / lk.bandwidth_mbps for lk in d.network.links if lk.bandwidth_mbps > 0), default=0.0
    )
    return float(d.cut_bits.max()) * _MS * slowest


def _period_cap(
    d: _Data,
    bounds: Bounds,
    n_stages: int,
    incumbent_energy_j: float | None,
    objective: Objective,
) -> float:
    """An upper bound on the period of every plan worth considering (seconds)."""
    compute = float(d.kappa.max()) * float(d.f.sum()) / _MS if len(d.kappa) else 0.0
    if d.shared:
        network = d.dirs * float(np.sort(d.cut_wire)[::-1][: max(n_stages - 1, 0)].sum()) / _MS
        network += n_stages * float(d.swire.max(initial=0.0)) * float(d.p.sum()) / _MS
    else:
        network = _max_cut_ms(d) / _MS + float(d.sring.max(initial=0.0)) * float(d.p.sum()) / _MS
    cap = max(compute, network, cost.MIN_BOTTLENECK_S)
    if d.workload.kind == "training":
        # The period is the whole step: every stage, transfer, all-reduce and path latency.
        lat = float(d.cut_lat.max(initial=0.0)) if d.shared else 0.0
        if not d.shared:
            lat = max((lk.latency_ms for lk in d.network.links), default=0.0)
        cap = (
            compute * n_stages
            + network * 2
            + n_stages * (d.dirs * lat + float(d.slat.max(initial=0.0))) / _MS
        )
    cap = min(cap, bounds.bottleneck_s)
    if objective == "min_energy" and incumbent_energy_j is not None and len(d.idle):
        least_idle = float(d.idle.min())
        if least_idle > 0:
            cap = min(cap, incumbent_energy_j / least_idle * (1 + 1e-6))
    if d.workload.rate_rps > 0:
        cap = max(cap, 1.0 / d.workload.rate_rps)
    return cap * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# Brute force (the tests' oracle)


def brute_force(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    bounds: Bounds | None = None,
    battery_hours: float | None = None,
    groups: bool = True,
) -> Plan | None:
    """The optimum by enumeration: every contiguous split, every ordered sequence of disjoint
    device groups, every whole-sample split inside a group. Scored by ``cost.evaluate`` alone.

    Small inputs only (``BRUTE_FORCE_MAX_DEVICES`` devices, ``BRUTE_FORCE_MAX_LAYERS`` layers).
    """
    n = len(table.layers)
    if len(devices) > BRUTE_FORCE_MAX_DEVICES or n > BRUTE_FORCE_MAX_LAYERS:
        raise ValueError(
            f"brute force is for <= {BRUTE_FORCE_MAX_DEVICES} devices and "
            f"<= {BRUTE_FORCE_MAX_LAYERS} layers"
        )
    bounds = bounds or Bounds.of(qoe, workload.batch)
    m = workload.batch
    max_group = m if groups else 1
    best: tuple[tuple[float, float], tuple[StagePlan, ...]] | None = None

    def group_options(
        pool: tuple[DeviceProfile, ...],
    ) -> Iterator[tuple[tuple[DeviceProfile, ...], tuple[int, ...]]]:
        for size in range(1, min(len(pool), max_group) + 1):
            for combo in itertools.combinations(pool, size):
                for split in _compositions(m, size):
                    yield combo, split

    def sequences(
        count: int, pool: tuple[DeviceProfile, ...]
    ) -> Iterator[list[tuple[tuple[DeviceProfile, ...], tuple[int, ...]]]]:
        if count == 0:
            yield []
            return
        for combo, split in group_options(pool):
            rest = tuple(dv for dv in pool if dv not in combo)
            for tail in sequences(count - 1, rest):
                yield [(combo, split), *tail]

    lookup: dict[str, DeviceProfile] = {dv.node_id: dv for dv in devices}
    for count in range(1, min(n, len(devices)) + 1):
        for cuts in itertools.combinations(range(1, n), count - 1):
            edges = (0, *cuts, n)
            for seq in sequences(count, tuple(devices)):
                stages = tuple(
                    StagePlan(
                        edges[k],
                        edges[k + 1] - 1,
                        tuple(
                            DeviceShare(dv.node_id, nn / m) for dv, nn in zip(*seq[k], strict=True)
                        ),
                    )
                    for k in range(count)
                )
                if not all(cost.fits(s, lookup, table, workload) for s in stages):
                    continue
                pc = cost.evaluate(stages, lookup, table, network, workload)
                if not (math.isfinite(pc.latency_s) and math.isfinite(pc.energy_j)):
                    continue
                if not meets_bounds(pc, bounds):
                    continue
                if not battery_ok(stages, devices, table, network, workload, battery_hours):
                    continue
                key = objective_key(qoe.objective, pc)
                if best is None or key < best[0]:
                    best = (key, stages)
    if best is None:
        return None
    return make_plan(best[1], devices, table, network, workload)


__all__ = [
    "Bounds",
    "IndexedNetwork",
    "MilpResult",
    "balanced_split",
    "battery_ok",
    "best_microbatch",
    "brute_force",
    "device_groups",
    "device_power_w",
    "indexed",
    "make_plan",
    "meets",
    "meets_bounds",
    "objective_key",
    "plan_id",
    "solve",
    "valid_plan",
]
