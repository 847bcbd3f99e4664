"""Dynamic programs over contiguous splits: the planner's fast path and its test oracle.

A plan here is a pipeline: the layers, in order, are cut into contiguous stages and each stage
runs on one device, every device at most once. Its cost is ``cost.py``'s model; every plan this
module returns carries ``cost.predict``'s figures. ``N`` is the number of layers, ``D`` the
number of devices considered.

Two exact engines share one precomputed ``_Problem``:

``_label_dp`` (exact for every objective and every combination of QoE bounds)
    Label-setting DP over states ``(next layer, set of used devices, last device)``. The set is
    a bitmask, so ordered device sequences are enumerated exactly. Each state keeps the Pareto
    front of the partial plans' criteria that matter for the objective and the bounds: latency
    ``L`` (additive), longest stage ``C`` (max), network time ``W`` (a sum on a shared medium, a
    max with per-pair links) and dynamic energy ``E`` (additive); idle power is a function of the
    device set, so it needs no label. Energy per microbatch is then
    ``max(C, W, 1/rate) * idle(set) + E``, monotone in the labels, so dominance pruning is exact.
    Work is ``O(2^D * D^2 * N^2 * F)`` for ``F`` labels per state, and ``F`` grows with ``N``:
    pure Python, for small inputs (``LABEL_WORK_LIMIT``, ``LABEL_TIME_BUDGET_S``).

``_vector_dp`` (exact for a weighted additive cost under per-element caps)
    The same state space, vectorised with numpy level by level (level = devices used). It
    minimises ``a*L + b*W_sum + g*E + d*idle`` with every stage time (and, with per-pair links,
    every transfer) at most ``cap``. The stage cost is separable, ``k_v * (G[j+1] - G[i])`` with
    prefix FLOPs ``G``, and the stages that fit in memory form a window of start layers, so the
    inner minimisation is a range-minimum query (sparse table). Partial plans whose unused
    devices cannot hold or compute the rest, or (given a threshold) cannot end below it, are
    dropped. Work is ``O(2^D * D * N * (log N + D))`` per run (the ``D`` term only for per-pair
    links): 0.05-0.15 s for 12 devices x 96 layers.

``_vector_search`` builds the objectives on ``_vector_dp``:
    - ``min_latency``: one run (``a = 1``, ``cap`` from the throughput bound). Exact whenever
      that relaxation's optimum meets the remaining bounds (always without an energy bound, and
      with per-pair links also with a throughput bound); when it misses the latency bound the
      bound is provably unreachable. Otherwise Lagrangian repair (a heuristic).
    - ``max_throughput``: binary search over the candidate bottleneck values (every stage time,
      and every transfer time with per-pair links), one run per step, each feasible run jumping
      to its plan's own bottleneck: exact, ``O(log(D N^2))`` runs. On a shared medium the
      network term is a sum, so each step minimises ``W`` under the compute cap; the optimum is
      ``min(cap_k, W_min(cap_{k-1}))`` around the first feasible ``cap_k`` (``W_min`` does not
      increase with the cap): exact as well. Ties go to the lower latency. With a latency bound
      it stays exact for per-pair links (the least latency under a cap falls as the cap grows).
    - ``min_energy``: energy is ``max(bottleneck, 1/rate) * idle + E``, not additive. Branch and
      bound over intervals of candidate bottlenecks: for plans with bottleneck in ``(lo, hi]``,
      the least ``max(lo, 1/rate) * idle + E`` under cap ``hi`` is a lower bound, attained on a
      one-candidate interval with per-pair links; best-first, stopping within ``ENERGY_GAP`` of
      the optimum. All rate-limited plans (bottleneck <= 1/rate) form one exact leaf, which is
      why a workload with a request rate plans in one or two runs. On a shared medium the
      network term is not a candidate value: intervals extend on a fine grid and are bounded
      with a Lagrangian term on ``W``, so there the result is near-optimal, not proven.
    QoE bounds the searches cannot take exactly are repaired with Lagrange multipliers (a
    bounded number of times), so a returned plan always meets them; only optimality is at stake.

``_solve`` (``strategy="auto"``) runs the vectorised search first; when it cannot prove its
answer and the input is small, the label DP gets a second, exact try. On the tests' random
instances (<= 4 devices, <= 7 layers) both ``auto`` and ``labels`` equal ``brute_force``, which
enumerates every split and ordered device assignment (<= 5 devices, <= 8 layers).

Above ``MAX_EXACT_DEVICES`` devices the search keeps the fastest ones (by GFLOP/s, then
memory): ``2^D`` states stop being affordable and a slow device rarely belongs in a pipeline
that twelve faster ones could form.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import structlog

from doramesh.errors import FailedPrecondition
from doramesh.types import (
    DeviceProfile,
    DeviceShare,
    Flow,
    LayerTable,
    Network,
    Objective,
    Plan,
    PlanId,
    PlanSet,
    QoESpec,
    StagePlan,
    Workload,
)

from . import cost

_log = structlog.get_logger("planner.dp")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

#: Largest fleet the searches see; above it only the fastest devices are considered.
MAX_EXACT_DEVICES = 12
#: Estimated label extensions under which the exact label DP is used for cases the vectorised
#: search cannot solve exactly (about a second of Python).
LABEL_WORK_LIMIT = 1_500_000
#: Time the exact label DP may add in ``auto`` mode to prove what the vectorised search could not.
LABEL_TIME_BUDGET_S = 1.0
#: Default time limit of the heuristic parts (energy scan, bound repair), in seconds.
DEFAULT_TIME_LIMIT_S = 10.0
#: Bounds are met up to this relative slack, so that a bound equal to the optimum is not lost
#: to rounding between the search's arithmetic and the cost model's.
BOUND_SLACK = 1e-9
#: Relative optimality gap at which the energy search stops: it proves its plan within this
#: fraction of the optimum (with per-pair links; see ``_search_min_energy``).
ENERGY_GAP = 1e-3
#: Spacing of the bottleneck grid above the longest stage on a shared medium, where the network
#: term (a sum) can take any value.
NETWORK_GRID_RATIO = 1.01
#: Brute force enumerates at most this many devices and layers.
BRUTE_FORCE_MAX_DEVICES = 5
BRUTE_FORCE_MAX_LAYERS = 8

Strategy = Literal["auto", "labels", "vector"]

_INF = math.inf

#: A plan inside this module: stages as (first layer, last layer, device index).
_Stages = tuple[tuple[int, int, int], ...]


# ---------------------------------------------------------------------------------------------
# Problem data


@dataclass(frozen=True, slots=True)
class _Bounds:
    """The QoE bounds in the search's units: seconds and joules per microbatch (inf = none)."""

    latency_s: float = _INF
    bottleneck_s: float = _INF
    energy_j: float = _INF

    @staticmethod
    def of(qoe: QoESpec, batch: int) -> _Bounds:
        return _Bounds(
            latency_s=qoe.latency_ms / 1e3 if qoe.latency_ms else _INF,
            bottleneck_s=batch / qoe.min_throughput_sps if qoe.min_throughput_sps else _INF,
            energy_j=qoe.energy_j_per_sample * batch if qoe.energy_j_per_sample else _INF,
        )


def _meets(value: float, bound: float) -> bool:
    return value <= bound * (1 + BOUND_SLACK) + 1e-15


@dataclass(frozen=True, slots=True)
class _Weights:
    """Coefficients of the additive cost ``_vector_dp`` minimises."""

    latency: float = 0.0
    network: float = 0.0
    energy: float = 0.0
    idle: float = 0.0

    def plus(self, other: _Weights) -> _Weights:
        return _Weights(
            self.latency + other.latency,
            self.network + other.network,
            self.energy + other.energy,
            self.idle + other.idle,
        )


@dataclass(frozen=True, slots=True)
class _Metrics:
    """A plan's criteria in the search's units (per microbatch)."""

    latency_s: float
    longest_stage_s: float
    network_s: float
    dynamic_j: float
    idle_w: float
    bottleneck_s: float
    energy_j: float


class _Problem:
    """Everything the searches need about one device subset, model and workload, as arrays.

    Index ``i`` of a cut is the first layer after it (cuts are at ``1..N-1``); ``comp[v, i, j]``
    is the compute time of layers ``i..j`` on device ``v``.
    """

    def __init__(
        self,
        devices: Sequence[DeviceProfile],
        table: LayerTable,
        network: Network,
        workload: Workload,
        *,
        steady: bool = False,
    ) -> None:
        self.devices = tuple(devices)
        self.table = table
        self.network = network
        self.workload = workload
        self.batch = workload.batch
        self.shared = network.kind == "shared"
        #: Whether a plan's bottleneck is its step (synchronous training steps, ``cost.py``).
        #: ``steady`` prices training as a pipeline in steady state instead: the limit of a
        #: GPipe step cut into many microbatches, whose time tends to the slowest element.
        self.training = workload.kind == "training" and not steady
        dirs = cost.direction_factor(workload.kind)
        d_count = self.n_devices = len(self.devices)
        n = self.n_layers = len(table.layers)
        self.rate_period_s = 1.0 / workload.rate_rps if workload.rate_rps > 0 else 0.0

        gflops = np.array(cost.layer_gflops(table, workload.kind), dtype=np.float64)
        self.gp: FloatArray = np.concatenate([[0.0], np.cumsum(gflops)])
        device_gflops = np.array([d.gflops for d in self.devices], dtype=np.float64)
        self.spg: FloatArray = self.batch / device_gflops  # seconds per per-sample GFLOP
        self.idle: FloatArray = np.array([d.power_idle_w for d in self.devices], dtype=np.float64)
        self.dyn: FloatArray = np.array(
            [d.power_active_w - d.power_idle_w for d in self.devices], dtype=np.float64
        )
        self.tx: FloatArray = np.array([d.power_tx_w for d in self.devices], dtype=np.float64)
        #: Every extension of a partial plan adds non-negative energy, so a partial plan over
        #: the energy bound can be dropped.
        self.monotone_energy = bool(
            (self.idle >= 0).all() and (self.dyn >= 0).all() and (self.tx >= 0).all()
        )

        idx = np.arange(n)
        upper = idx[:, None] <= idx[None, :]  # [i, j]: i <= j
        span = self.gp[None, 1:] - self.gp[:-1, None]  # [i, j] = G[j+1] - G[i]
        self.comp: FloatArray = np.where(upper[None], span[None] * self.spg[:, None, None], _INF)
        memory = _memory_matrix(table, workload)
        capacity = np.array([d.memory_bytes for d in self.devices], dtype=np.int64)
        fit = (memory[None] <= capacity[:, None, None]) & upper[None]
        # For a fixed last layer the stages that fit start at a suffix of 0..j.
        self.lo_mem: IntArray = (idx[None, :] + 1 - fit.sum(axis=1)).astype(np.int64)
        self.memory = memory

        bandwidth = np.zeros((d_count, d_count))
        latency = np.zeros((d_count, d_count))
        for u, a in enumerate(self.devices):
            for v, b in enumerate(self.devices):
                if u != v:
                    bandwidth[u, v], latency[u, v] = network.link(a.node_id, b.node_id)
        self.has_link: BoolArray = (bandwidth > 0) & np.isfinite(latency)
        np.fill_diagonal(self.has_link, False)
        safe_bw = np.where(self.has_link, bandwidth, 1.0)
        safe_lat = np.where(self.has_link, latency, 0.0) / 1e3
        act = np.zeros(n + 1)
        act[1:n] = [layer.activation_bytes * self.batch for layer in table.layers[: n - 1]]
        wire = act[None, None, :] * 8.0 / (safe_bw[:, :, None] * 1e6)  # [u, v, i], one way
        self.cut_ok: BoolArray = np.zeros(n + 1, dtype=bool)
        self.cut_ok[1:n] = True
        self.wire = wire
        self.cut_latency: FloatArray = dirs * (wire + safe_lat[:, :, None])
        self.cut_net: FloatArray = wire * (dirs if self.shared else 1)
        self.cut_energy: FloatArray = (
            self.tx[:, None, None] + (dirs - 1) * self.tx[None, :, None]
        ) * wire
        self.dirs = dirs
        self._level_masks: list[IntArray] | None = None
        self._scratch: dict[str, FloatArray] = {}
        self._unused: tuple[IntArray, FloatArray] | None = None
        #: Bytes every split needs for layers i.. at least: their parameters (and, training,
        #: their optimiser state), whichever devices hold them.
        factor = cost.TRAINING_STATE_FACTOR if workload.kind == "training" else 1
        params = np.array([layer.param_bytes for layer in table.layers], dtype=np.int64)
        self.rest_params: IntArray = np.concatenate([np.cumsum(params[::-1])[::-1], [0]]) * factor

    # -- helpers shared by the searches -------------------------------------------------------

    def windows(self, cap: float) -> IntArray:
        """``lo[v, j]``: first start layer of a stage ending at ``j`` on ``v`` that fits memory
        and takes at most ``cap`` seconds (``j + 1`` when none does)."""
        if math.isinf(cap):
            return self.lo_mem
        n = self.n_layers
        ok = self.comp <= cap * (1 + BOUND_SLACK)
        lo_cap = np.arange(n)[None, :] + 1 - ok.sum(axis=1)
        out: IntArray = np.maximum(self.lo_mem, lo_cap)
        return out

    def scratch(self, name: str, shape: tuple[int, ...]) -> FloatArray:
        """A reusable float buffer of at least ``shape`` (contents undefined)."""
        size = math.prod(shape)
        buf = self._scratch.get(name)
        if buf is None or buf.size < size:
            buf = self._scratch[name] = np.empty(size)
        view: FloatArray = buf[:size].reshape(shape)
        return view

    def unused_capacity(self) -> tuple[IntArray, FloatArray]:
        """Per device mask: memory bytes and GFLOP/s of the devices *not* in it."""
        if self._unused is None:
            masks = np.arange(1 << self.n_devices, dtype=np.int64)
            mem = np.zeros(len(masks), dtype=np.int64)
            gflops = np.zeros(len(masks))
            for v, device in enumerate(self.devices):
                out = ((masks >> v) & 1) == 0
                mem[out] += device.memory_bytes
                gflops[out] += device.gflops
            self._unused = (mem, gflops)
        return self._unused

    def level_masks(self) -> list[IntArray]:
        if self._level_masks is None:
            masks = np.arange(1 << self.n_devices, dtype=np.int64)
            counts = np.zeros_like(masks)
            for v in range(self.n_devices):
                counts += (masks >> v) & 1
            self._level_masks = [masks[counts == k] for k in range(self.n_devices + 1)]
        return self._level_masks

    def metrics(self, stages: _Stages) -> _Metrics:
        """The criteria of a plan, computed like ``cost.evaluate`` for single-device stages."""
        latency = longest = network = dynamic = idle = 0.0
        previous = -1
        for first, last, v in stages:
            seconds = float(self.comp[v, first, last])
            latency += seconds
            longest = max(longest, seconds)
            dynamic += float(self.dyn[v]) * seconds
            idle += float(self.idle[v])
            if previous >= 0:
                latency += float(self.cut_latency[previous, v, first])
                net = float(self.cut_net[previous, v, first])
                network = network + net if self.shared else max(network, net)
                dynamic += float(self.cut_energy[previous, v, first])
            previous = v
        bottleneck = max(longest, network, cost.MIN_BOTTLENECK_S)
        if self.training:
            bottleneck = max(bottleneck, latency)  # synchronous steps do not overlap
        energy = max(bottleneck, self.rate_period_s) * idle + dynamic
        return _Metrics(latency, longest, network, dynamic, idle, bottleneck, energy)

    def meets(self, m: _Metrics, bounds: _Bounds) -> bool:
        return (
            _meets(m.latency_s, bounds.latency_s)
            and _meets(m.bottleneck_s, bounds.bottleneck_s)
            and _meets(m.energy_j, bounds.energy_j)
        )

    def label_work(self) -> float:
        """Rough count of label extensions the exact label DP performs with one label a state."""
        d, n = self.n_devices, self.n_layers
        return float((1 << d) * d * (n + 1) * d * max(1.0, n / 2))

    def node_ids(self, stages: _Stages) -> list[str]:
        return [self.devices[v].node_id for _, _, v in stages]


def _memory_matrix(table: LayerTable, workload: Workload) -> IntArray:
    """``mem[i, j]`` = ``cost.stage_memory_bytes(table, i, j, samples=batch)`` for ``i <= j``."""
    n = len(table.layers)
    batch = workload.batch
    inflight = cost.inflight_microbatches(workload.kind)
    params = np.array([layer.param_bytes for layer in table.layers], dtype=np.int64)
    act = np.array([layer.activation_bytes for layer in table.layers], dtype=np.int64)
    work = np.array([layer.workspace_bytes for layer in table.layers], dtype=np.int64)
    inputs = np.array([cost.input_bytes_of(table, i) for i in range(n)], dtype=np.int64)
    pp = np.concatenate([[0], np.cumsum(params)])
    mem = np.zeros((n, n), dtype=np.int64)
    if workload.kind == "training":
        ip = np.concatenate([[0], np.cumsum(inputs)])
        for i in range(n):
            ws = np.maximum.accumulate(work[i:])
            kept = ip[i + 1 :] - ip[i] + act[i:]
            mem[i, i:] = (pp[i + 1 :] - pp[i]) * cost.TRAINING_STATE_FACTOR + (
                kept + ws
            ) * batch * inflight
    else:
        peak_layer = inputs + act + work
        for i in range(n):
            peak = np.maximum.accumulate(peak_layer[i:])
            mem[i, i:] = pp[i + 1 :] - pp[i] + peak * batch * inflight
    return mem


# ---------------------------------------------------------------------------------------------
# Exact label DP


class _Timeout(Exception):
    pass


def _label_dp(
    pb: _Problem, objective: Objective, bounds: _Bounds, deadline: float
) -> _Stages | None:
    """Best plan for ``objective`` under ``bounds``, exactly (see the module docstring)."""
    n, d_count = pb.n_layers, pb.n_devices
    need_energy = objective == "min_energy" or math.isfinite(bounds.energy_j)
    # A training step's period is its latency, so its energy needs the latency too.
    need_latency = (
        objective == "min_latency"
        or math.isfinite(bounds.latency_s)
        or (pb.training and need_energy)
    )
    need_bottleneck = (
        objective == "max_throughput" or math.isfinite(bounds.bottleneck_s) or need_energy
    )
    shared = pb.shared
    comp = pb.comp.tolist()
    lo_mem = pb.lo_mem.tolist()
    dyn = pb.dyn.tolist()
    idle = pb.idle.tolist()
    has_link = pb.has_link.tolist()
    cut_latency = pb.cut_latency.tolist()
    cut_net = pb.cut_net.tolist()
    cut_energy = pb.cut_energy.tolist()
    cap_l, cap_b, cap_e = bounds.latency_s, bounds.bottleneck_s, bounds.energy_j
    cap_l *= 1 + BOUND_SLACK
    cap_b *= 1 + BOUND_SLACK
    cap_e *= 1 + BOUND_SLACK
    prune_energy = pb.monotone_energy and math.isfinite(cap_e)
    rate_period = pb.rate_period_s

    def key(label: _Label) -> tuple[float, ...]:
        out: tuple[float, ...] = ()
        if need_latency:
            out += (label[0],)
        if need_bottleneck:
            out += (label[1], label[2]) if shared else (max(label[1], label[2]),)
        if need_energy:
            out += (label[3],)
        return out

    mask_idle = [0.0] * (1 << d_count)
    for mask in range(1, 1 << d_count):
        low = (mask & -mask).bit_length() - 1
        mask_idle[mask] = mask_idle[mask & (mask - 1)] + idle[low]

    states: list[dict[tuple[int, int], list[_Label]]] = [{} for _ in range(n + 1)]
    for v in range(d_count):
        for j in range(n):
            if lo_mem[v][j] > 0:
                break
            seconds = comp[v][0][j]
            if seconds > cap_b or seconds > cap_l:
                break
            energy = dyn[v] * seconds
            if prune_energy and max(seconds, rate_period) * idle[v] + energy > cap_e:
                break
            label: _Label = (seconds, seconds, 0.0, energy, 0, v, None)
            states[j + 1].setdefault((1 << v, v), []).append(label)

    for i in range(1, n):
        for (mask, u), labels in states[i].items():
            if time.monotonic() > deadline:
                raise _Timeout
            front = _pareto(labels, key)
            states[i][(mask, u)] = front
            for v in range(d_count):
                if mask >> v & 1 or not has_link[u][v]:
                    continue
                c_lat = cut_latency[u][v][i]
                c_net = cut_net[u][v][i]
                c_energy = cut_energy[u][v][i]
                new_mask = mask | (1 << v)
                new_idle = mask_idle[new_mask]
                row = comp[v][i]
                lo_v = lo_mem[v]
                for lab in front:
                    network = lab[2] + c_net if shared else max(lab[2], c_net)
                    if network > cap_b:
                        continue
                    base_latency = lab[0] + c_lat
                    base_energy = lab[3] + c_energy
                    for j in range(i, n):
                        if lo_v[j] > i:
                            break
                        seconds = row[j]
                        if seconds > cap_b:
                            break
                        latency = base_latency + seconds
                        if latency > cap_l:
                            break
                        energy = base_energy + dyn[v] * seconds
                        longest = max(lab[1], seconds)
                        if prune_energy and (
                            max(longest, network, rate_period) * new_idle + energy > cap_e
                        ):
                            break
                        states[j + 1].setdefault((new_mask, v), []).append(
                            (latency, longest, network, energy, i, v, lab)
                        )

    best: _Label | None = None
    best_key: tuple[float, ...] = ()
    for (mask, _v), labels in states[n].items():
        for lab in labels:
            bottleneck = max(lab[1], lab[2], cost.MIN_BOTTLENECK_S)
            if pb.training:
                bottleneck = max(bottleneck, lab[0])  # synchronous steps do not overlap
            energy = max(bottleneck, rate_period) * mask_idle[mask] + lab[3]
            if not (
                _meets(lab[0], bounds.latency_s)
                and _meets(bottleneck, bounds.bottleneck_s)
                and _meets(energy, bounds.energy_j)
            ):
                continue
            k = _objective_key(objective, lab[0], bottleneck, energy)
            if best is None or k < best_key:
                best, best_key = lab, k
    if best is None:
        return None
    return _unwind(best, n)


#: (latency, longest stage, network, dynamic energy, first layer, device, parent)
_Label = tuple[float, float, float, float, int, int, "_Label | None"]
_KeyFn = Callable[[_Label], tuple[float, ...]]


def _unwind(label: _Label, n_layers: int) -> _Stages:
    stages: list[tuple[int, int, int]] = []
    end = n_layers - 1
    node: _Label | None = label
    while node is not None:
        first, v = node[4], node[5]
        stages.append((first, end, v))
        end = first - 1
        node = node[6]
    return tuple(reversed(stages))


def _pareto(labels: list[_Label], key: _KeyFn) -> list[_Label]:
    """Labels no other label beats on every criterion (ties keep the first)."""
    if len(labels) <= 1:
        return labels
    keyed = sorted(((key(lab), lab) for lab in labels), key=lambda kl: kl[0])
    if len(keyed[0][0]) == 1:
        return [keyed[0][1]]
    kept: list[tuple[tuple[float, ...], _Label]] = []
    for k, lab in keyed:
        if any(all(a <= b for a, b in zip(kk, k, strict=True)) for kk, _ in kept):
            continue
        kept.append((k, lab))
    return [lab for _, lab in kept]


def _objective_key(
    objective: Objective, latency: float, bottleneck: float, energy: float
) -> tuple[float, float]:
    """Sort key of a plan: the objective first, then a sensible tie-break."""
    if objective == "min_latency":
        return (latency, energy)
    if objective == "max_throughput":
        return (bottleneck, latency)
    return (energy, latency)


# ---------------------------------------------------------------------------------------------
# Vectorised scalar DP


def _vector_dp(
    pb: _Problem,
    weights: _Weights,
    cap: float = _INF,
    *,
    cap_cuts: bool = True,
    threshold: float = _INF,
) -> _Stages | None:
    """Minimum of ``weights``' additive cost with every element at most ``cap`` (exact).

    ``cap_cuts=False`` caps the stages only, leaving the transfers free (a shared medium's
    network term is a sum, which the caller bounds itself). With a finite ``threshold`` only
    plans cheaper than it are sought: partial plans that cannot end below it are dropped (which
    empties whole device sets early), and None then means "none below the threshold".
    """
    d_count, n = pb.n_devices, pb.n_layers
    kappa = (weights.latency + weights.energy * pb.dyn) * pb.spg  # cost per unit of G
    device_cost = weights.idle * pb.idle
    lo = pb.windows(cap)
    j_idx = np.arange(n)
    valid = lo <= j_idx[None, :]
    length = np.where(valid, j_idx[None, :] - lo + 1, 1)
    power = np.floor(np.log2(length)).astype(np.int64)
    start = np.where(valid, lo, 0)
    start2 = np.where(valid, j_idx[None, :] - (1 << power) + 1, 0)
    n_pow = int(power.max()) + 1
    tail = kappa[:, None] * pb.gp[None, 1:] + device_cost[:, None]  # (D, N)
    # What the layers after i cost at least: the cheapest device's rate, cuts and idle >= 0.
    rest = (pb.gp[-1] - pb.gp) * float(kappa.min())
    limit = threshold - rest[1:]  # (N,): a state (., ., j+1) must stay below this
    prune = math.isfinite(threshold) and float(device_cost.min()) >= 0
    # A partial plan is dead if the devices it has not used cannot hold, or (under a cap)
    # cannot compute within the cap, the layers it has left.
    left_mem, left_gflops = pb.unused_capacity()
    rest_params = pb.rest_params[1:]  # for states (., ., i) with i = 1..N
    rest_work = (pb.gp[-1] - pb.gp[1:]) * pb.batch / (cap * (1 + BOUND_SLACK))

    cut_cost = _cut_costs(pb, weights, cap if cap_cuts else _INF)
    table = pb.scratch("table", (1 << d_count, d_count, n + 1))
    table.fill(_INF)
    for v in range(d_count):
        js = np.nonzero(lo[v] == 0)[0]
        table[1 << v, v, js + 1] = tail[v, js]
        hopeless = (rest_params > left_mem[1 << v]) | (rest_work > left_gflops[1 << v])
        table[1 << v, v, 1:][hopeless] = _INF
    if prune:
        table[:, :, 1:][table[:, :, 1:] >= limit] = _INF

    bits = np.arange(d_count, dtype=np.int64)
    # Range-minimum queries read a sparse table laid out as (mask, device, power, layer); these
    # are the flat offsets of the two halves of each (device, last layer) window in one row.
    width_row = n + 1
    base = bits[:, None] * (n_pow * width_row) + power * width_row
    first_half = (base + start).ravel()
    second_half = (base + start2).ravel()
    invalid = ~valid.ravel()
    head = kappa[None, :, None] * pb.gp[None, None, :]
    levels = pb.level_masks()
    chunk = max(1, 1_000_000 // (d_count * n_pow * (n + 1)))
    # Reused between chunks and runs: fresh multi-megabyte arrays cost page faults each time.
    buffer = pb.scratch("sparse", (chunk, d_count, n_pow, n + 1))
    for k in range(1, d_count):
        masks = levels[k]
        alive = np.isfinite(table[masks, :, 1:n]).any(axis=(1, 2))
        masks = masks[alive]
        for c0 in range(0, len(masks), chunk):
            cm = masks[c0 : c0 + chunk]
            m_count = len(cm)
            enter = _enter_costs(pb, table[cm], cut_cost)  # (M, D, N+1)
            member = ((cm[:, None] >> bits[None, :]) & 1).astype(bool)
            enter[member] = _INF
            sparse = buffer[:m_count]
            np.subtract(enter, head, out=sparse[:, :, 0, :])
            for p in range(1, n_pow):
                half = 1 << (p - 1)
                width = width_row - (1 << p) + 1
                np.minimum(
                    sparse[:, :, p - 1, :width],
                    sparse[:, :, p - 1, half : half + width],
                    out=sparse[:, :, p, :width],
                )
                sparse[:, :, p, width:] = _INF
            rows = sparse.reshape(m_count, -1)
            best = np.minimum(rows[:, first_half], rows[:, second_half])  # (M, D*N)
            best[:, invalid] = _INF
            new = best.reshape(m_count, d_count, n) + tail[None]
            grown = cm[:, None] | (1 << bits)[None, :]  # (M, D): the mask after adding v
            hopeless = (rest_params[None, None, :] > left_mem[grown][:, :, None]) | (
                rest_work[None, None, :] > left_gflops[grown][:, :, None]
            )
            new[hopeless] = _INF
            if prune:
                new[new >= limit] = _INF
            for v in range(d_count):
                sel = ~member[:, v]
                table[cm[sel] | (1 << v), v, 1:] = new[sel, v]

    final = table[:, :, n]
    flat = int(np.argmin(final))
    if not math.isfinite(float(final.flat[flat])):
        return None
    mask, v = divmod(flat, d_count)
    return _vector_unwind(pb, table, cut_cost, kappa, device_cost, lo, mask, v)


@dataclass(frozen=True, slots=True)
class _CutCost:
    """Weighted cost of a cut: ``sender[u, i] + receiver[v, i]`` on a shared medium, else
    ``pair[u, v, i]``; inf where the cut is not allowed."""

    sender: FloatArray | None
    receiver: FloatArray | None
    pair: FloatArray | None

    def at(self, u: int, v: int, i: int) -> float:
        if self.pair is not None:
            return float(self.pair[u, v, i])
        assert self.sender is not None and self.receiver is not None
        return float(self.sender[u, i] + self.receiver[v, i])


def _cut_costs(pb: _Problem, w: _Weights, cap: float) -> _CutCost:
    allowed = pb.cut_ok[None, None, :] & pb.has_link[:, :, None]
    if math.isfinite(cap):
        allowed &= pb.cut_net <= cap * (1 + BOUND_SLACK)
    if pb.shared and bool(pb.has_link[~np.eye(pb.n_devices, dtype=bool)].all()):
        # Every pair shares the medium: the cost splits into a sender's and a receiver's part,
        # which makes entering a stage O(D) instead of O(D^2) per state.
        # Any pair will do: a shared medium's cut costs the same between every two devices.
        any_pair = (0, 1) if pb.n_devices > 1 else (0, 0)
        ok = allowed[any_pair] if pb.n_devices > 1 else pb.cut_ok
        wire = pb.wire[any_pair]
        common = w.latency * pb.cut_latency[any_pair] + w.network * pb.cut_net[any_pair]
        sender = np.where(ok[None, :], w.energy * pb.tx[:, None] * wire[None, :], _INF)
        receiver = np.where(
            ok[None, :],
            common[None, :] + w.energy * (pb.dirs - 1) * pb.tx[:, None] * wire[None, :],
            _INF,
        )
        return _CutCost(sender=sender, receiver=receiver, pair=None)
    pair = np.where(
        allowed,
        w.latency * pb.cut_latency + w.network * pb.cut_net + w.energy * pb.cut_energy,
        _INF,
    )
    return _CutCost(sender=None, receiver=None, pair=pair)


def _enter_costs(pb: _Problem, cur: FloatArray, cut: _CutCost) -> FloatArray:
    """``enter[m, v, i]``: cheapest way to have covered layers ``< i`` and cut towards ``v``."""
    if cut.pair is None:
        assert cut.sender is not None and cut.receiver is not None
        out: FloatArray = (cur + cut.sender[None]).min(axis=1)[:, None, :] + cut.receiver[None]
        return out
    # min over u of cur[m, u, i] + pair[u, v, i], one u at a time to keep temporaries small
    out = cur[:, 0, None, :] + cut.pair[0][None]
    step = np.empty_like(out)
    for u in range(1, cur.shape[1]):
        np.add(cur[:, u, None, :], cut.pair[u][None], out=step)
        np.minimum(out, step, out=out)
    return out


def _vector_unwind(
    pb: _Problem,
    table: FloatArray,
    cut: _CutCost,
    kappa: FloatArray,
    device_cost: FloatArray,
    lo: IntArray,
    mask: int,
    v: int,
) -> _Stages:
    """Recover the stages of the optimum at ``(mask, v, N)`` by recomputing each argmin."""
    stages: list[tuple[int, int, int]] = []
    end = pb.n_layers
    while True:
        j = end - 1
        previous = mask & ~(1 << v)
        stage_tail = float(kappa[v] * pb.gp[end] + device_cost[v])
        if previous == 0:
            stages.append((0, j, v))
            break
        best = (_INF, -1, -1)
        for i in range(max(int(lo[v, j]), 1), j + 1):
            head = float(kappa[v] * pb.gp[i])
            for u in range(pb.n_devices):
                if not previous >> u & 1:
                    continue
                value = float(table[previous, u, i]) + cut.at(u, v, i) - head + stage_tail
                if value < best[0]:
                    best = (value, i, u)
        _, first, u_best = best
        if first < 0:  # cannot happen for a finite optimum
            raise AssertionError("vector DP lost its argmin")
        stages.append((first, j, v))
        mask, v, end = previous, u_best, first
    return tuple(reversed(stages))


# ---------------------------------------------------------------------------------------------
# Objectives over the vectorised DP


@dataclass(slots=True)
class _Incumbent:
    objective: Objective
    bounds: _Bounds
    pb: _Problem
    stages: _Stages | None = None
    key: tuple[float, float] = (_INF, _INF)
    exact: bool = False
    runs: int = 0
    tried: set[_Stages] = field(default_factory=set)
    gap: float = ENERGY_GAP
    """Relative optimality gap the energy search may stop at (0 = prove the optimum)."""
    repairs_left: int = 8
    """Lagrangian repairs the search may still try: each costs up to ~20 runs."""

    def offer(self, stages: _Stages | None) -> _Metrics | None:
        """Consider a candidate plan; returns its metrics (None for no plan)."""
        if stages is None:
            return None
        m = self.pb.metrics(stages)
        if stages in self.tried:
            return m
        self.tried.add(stages)
        if self.pb.meets(m, self.bounds):
            k = _objective_key(self.objective, m.latency_s, m.bottleneck_s, m.energy_j)
            if k < self.key:
                self.stages, self.key = stages, k
        return m


def _vector_search(
    pb: _Problem, objective: Objective, bounds: _Bounds, deadline: float, *, gap: float = ENERGY_GAP
) -> tuple[_Stages | None, bool]:
    """Best plan found with the vectorised DP, and whether it is provably optimal."""
    inc = _Incumbent(objective, bounds, pb, gap=gap)
    if objective == "min_latency":
        _search_min_latency(inc, deadline)
    elif objective == "max_throughput":
        _search_max_throughput(inc, deadline)
    else:
        _search_min_energy(inc, deadline)
    if inc.stages is None and math.isfinite(bounds.energy_j) and objective != "min_energy":
        # The penalties missed the energy bound; the energy search knows how to meet it, and
        # whatever it tries is a candidate for this objective too.
        helper = _Incumbent("min_energy", bounds, pb, gap=inc.gap)
        _search_min_energy(helper, deadline)
        for stages in helper.tried:
            inc.offer(stages)
        inc.exact = False
    return inc.stages, inc.exact and inc.stages is not None


def _run(
    inc: _Incumbent,
    weights: _Weights,
    cap: float = _INF,
    *,
    cap_cuts: bool = True,
    threshold: float = _INF,
) -> _Stages | None:
    inc.runs += 1
    return _vector_dp(inc.pb, weights, cap, cap_cuts=cap_cuts, threshold=threshold)


def _search_min_latency(inc: _Incumbent, deadline: float) -> None:
    bounds = inc.bounds
    stages = _run(inc, _Weights(latency=1.0), bounds.bottleneck_s)
    m = inc.offer(stages)
    if m is None:
        inc.exact = True  # nothing fits within memory and the throughput cap
        return
    if inc.stages is not None:
        inc.exact = True  # the relaxation's optimum is feasible
        return
    if not _meets(m.latency_s, bounds.latency_s):
        inc.exact = True  # even the relaxation misses the latency bound
        return
    _repair(inc, _Weights(latency=1.0), bounds.bottleneck_s, m, deadline)


def _search_max_throughput(inc: _Incumbent, deadline: float) -> None:
    pb, bounds = inc.pb, inc.bounds
    candidates = _bottleneck_candidates(pb)
    candidates = candidates[candidates <= bounds.bottleneck_s * (1 + BOUND_SLACK)]
    if math.isfinite(bounds.bottleneck_s):
        candidates = np.append(candidates, bounds.bottleneck_s)
    if len(candidates) == 0:
        inc.exact = True
        return
    exact = not math.isfinite(bounds.energy_j) and (
        not pb.shared or not math.isfinite(bounds.latency_s)
    )

    def feasible(index: int) -> tuple[_Stages | None, _Stages | None]:
        """(plan meeting cap and bounds, shared medium's network-minimal plan)."""
        cap = float(candidates[index])
        if not pb.shared:
            stages = _run(inc, _Weights(latency=1.0), cap)
            m = inc.offer(stages)
            if m is None or pb.meets(m, bounds):
                return stages, None
            if not _meets(m.latency_s, bounds.latency_s):
                return None, None  # the least latency under this cap is too slow: exact
            return _repair(inc, _Weights(latency=1.0), cap, m, deadline), None
        # Only a network term below the best bottleneck so far can matter.
        lean = _run(inc, _Weights(network=1.0), cap, cap_cuts=False, threshold=inc.key[0])
        m = inc.offer(lean)
        if m is None or not _meets(m.network_s, cap):
            return None, lean
        fast = _run(inc, _Weights(latency=1.0), cap)
        fm = inc.offer(fast)
        if fm is not None and _meets(fm.network_s, cap) and pb.meets(fm, bounds):
            return fast, lean
        if pb.meets(m, bounds):
            return lean, lean
        return _repair(inc, _Weights(network=1.0), cap, m, deadline, network_cap=cap), lean

    top = len(candidates) - 1
    found, lean = feasible(top)
    lo_i, hi_i = -1, top  # invariant: infeasible at lo_i (or below the range), feasible at hi_i
    below_lean: _Stages | None = None
    if found is None:
        # Only a shared medium's network-bound plans remain (already offered), or none.
        lo_i = hi_i
    else:
        hi_i = min(hi_i, int(np.searchsorted(candidates, pb.metrics(found).bottleneck_s, "left")))
    while hi_i - lo_i > 1 and time.monotonic() < deadline:
        mid = (lo_i + hi_i) // 2
        found, lean = feasible(mid)
        if found is None:
            lo_i, below_lean = mid, lean
        else:
            reach = int(np.searchsorted(candidates, pb.metrics(found).bottleneck_s, "left"))
            hi_i = min(mid, max(reach, lo_i + 1))
    inc.exact = exact and hi_i - lo_i <= 1
    if pb.shared and below_lean is not None:
        inc.offer(below_lean)  # its network term may undercut the next candidate
    if inc.stages is not None:
        # Break ties by latency among the plans at the optimal bottleneck.
        best_cap = pb.metrics(inc.stages).bottleneck_s
        inc.offer(_run(inc, _Weights(latency=1.0), best_cap))


def _bottleneck_candidates(pb: _Problem) -> FloatArray:
    """Every value a plan's bottleneck element can take, above a lower bound, sorted."""
    n = pb.n_layers
    i_idx = np.arange(n)[None, :, None]
    fit = i_idx >= pb.lo_mem[:, None, :]
    values = [pb.comp[fit & np.isfinite(pb.comp)]]
    if not pb.shared:
        allowed = pb.cut_ok[None, None, :] & pb.has_link[:, :, None]
        values.append(pb.cut_net[allowed])
    every = np.unique(np.concatenate(values))
    # Every layer runs somewhere, and all of the work is shared by at most all devices.
    single = np.where(
        np.arange(n)[None, :] >= pb.lo_mem, pb.comp[:, np.arange(n), np.arange(n)], _INF
    ).min(axis=0)
    floor = max(
        float(single.max()) if n else 0.0,
        float(pb.gp[-1] * pb.batch / np.sum(pb.batch / pb.spg)),
    ) * (1 - 1e-12)
    return every[every >= floor]


def _search_min_energy(inc: _Incumbent, deadline: float) -> None:
    """Branch and bound over intervals of candidate bottlenecks (see ``_energy_node``).

    Exact with per-pair links when it finishes and no bound needed repairing; on a shared medium
    the network term can fall between candidates, so the leaves only bound it.
    """
    pb, bounds = inc.pb, inc.bounds
    candidates = _bottleneck_candidates(pb)
    candidates = candidates[candidates <= bounds.bottleneck_s * (1 + BOUND_SLACK)]
    if math.isfinite(bounds.bottleneck_s):
        candidates = np.append(candidates, bounds.bottleneck_s)
    if len(candidates) == 0:
        inc.exact = True
        return
    exact = not pb.shared
    if pb.shared:
        candidates = _with_network_grid(pb, candidates, bounds.bottleneck_s)
    top = len(candidates) - 1
    heap: list[tuple[float, int, _EnergyNode]] = []
    order = itertools.count()

    def push(node: _EnergyNode | None) -> None:
        if node is not None:
            heapq.heappush(heap, (node.bound, next(order), node))

    # Plans whose bottleneck is within the requested rate's period all pay that period.
    rated = int(np.searchsorted(candidates, pb.rate_period_s, "right")) - 1
    if rated >= 0:
        push(_energy_node(inc, candidates, 0, rated, leaf=True))
    if rated < top:
        push(_energy_node(inc, candidates, rated + 1, top, leaf=rated + 1 == top))
    while heap:
        if time.monotonic() > deadline:
            exact = False
            break
        bound, _, node = heapq.heappop(heap)
        if bound >= inc.key[0] * (1 - inc.gap):
            break  # no open interval can beat the incumbent by more than the gap
        if node.leaf:
            if node.metrics is not None and not pb.meets(node.metrics, bounds):
                exact = False
                _repair(inc, node.weights, node.cap, node.metrics, deadline)
            continue
        mid = (node.first + node.last) // 2
        push(_energy_node(inc, candidates, node.first, mid, leaf=node.first == mid))
        push(_energy_node(inc, candidates, mid + 1, node.last, leaf=mid + 1 == node.last))
    inc.exact = exact and inc.gap == 0


@dataclass(frozen=True, slots=True)
class _EnergyNode:
    """Plans whose bottleneck lies in ``(candidates[first - 1], candidates[last]]``."""

    first: int
    last: int
    leaf: bool
    cap: float
    weights: _Weights
    bound: float
    metrics: _Metrics | None


def _energy_node(
    inc: _Incumbent, candidates: FloatArray, first: int, last: int, *, leaf: bool
) -> _EnergyNode | None:
    """Lower bound of the energy of the plans in an interval, from one ``_vector_dp`` run.

    Every such plan has its bottleneck at most ``cap = candidates[last]`` and pays idle power
    for at least ``period = max(candidates[first - 1], 1/rate)``, so the least
    ``period * idle + dynamic`` under ``cap`` bounds them all. With per-pair links a bottleneck
    is always a candidate, so ``period`` can start at ``candidates[first]`` and a one-candidate
    interval's bound is attained: the leaf is solved exactly.
    """
    pb = inc.pb
    top = len(candidates) - 1
    cap = float(candidates[last]) if last <= top else _INF
    if pb.shared:
        low = float(candidates[first - 1]) if first > 0 else 0.0
    else:
        low = float(candidates[first])
    period = max(low, pb.rate_period_s)
    weights = _Weights(energy=1.0, idle=period)
    # Only plans that could improve on the incumbent by more than the gap matter here.
    threshold = inc.key[0] * (1 - inc.gap) if math.isfinite(inc.key[0]) else _INF
    if not pb.monotone_energy:
        threshold = _INF
    stages = _run(inc, weights, cap, threshold=threshold)
    m = inc.offer(stages)
    if m is None:
        return None
    bound = period * m.idle_w + m.dynamic_j
    bounds = inc.bounds
    if not _meets(bound, bounds.energy_j):
        return None  # every plan here needs more than the energy bound
    if not _meets(m.latency_s, bounds.latency_s):
        # Prove the latency bound reachable in this interval, or drop the interval.
        quick = _run(
            inc, _Weights(latency=1.0), cap, threshold=bounds.latency_s * (1 + BOUND_SLACK)
        )
        if quick is None:
            return None
        inc.offer(quick)
    if pb.meets(m, bounds) and m.energy_j <= bound * (1 + 1e-12):
        leaf = True  # the bound is attained by a feasible plan: nothing here does better
    elif pb.shared and m.network_s > period and math.isfinite(cap):
        # On a shared medium the period is often the network's air time, which the bound above
        # ignores. Every plan here has W <= cap: if no plan does, the interval is empty.
        if m.network_s > cap * (1 + BOUND_SLACK):
            lean = _run(inc, _Weights(network=1.0), cap, threshold=cap * (1 + BOUND_SLACK))
            if lean is None:
                return None
            inc.offer(lean)
        # Otherwise, for any mu >= 0 the least of ``period * idle + dynamic + mu * (W - cap)``
        # bounds them too (weak duality); mu near the plan's idle power prices the air time at
        # what it costs in idle draw.
        mu = m.idle_w
        priced = _Weights(energy=1.0, idle=period, network=mu)
        second = _run(inc, priced, cap, threshold=threshold + mu * cap)
        if second is None:
            return None  # nothing here beats the incumbent by more than the gap
        m2 = inc.offer(second)
        assert m2 is not None
        bound = max(bound, period * m2.idle_w + m2.dynamic_j + mu * (m2.network_s - cap))
    return _EnergyNode(first, last, leaf, cap, weights, bound, m)


def _with_network_grid(pb: _Problem, candidates: FloatArray, cap: float) -> FloatArray:
    """Candidates extended, on a shared medium, with a fine geometric grid up to the largest
    network term a plan can have, so that network-bound plans fall into bounded intervals."""
    top = float(candidates[-1])
    if pb.n_devices < 2 or pb.n_layers < 2:
        return candidates
    cuts = np.sort(pb.cut_net[0, 1, 1 : pb.n_layers])[::-1]
    most = min(float(cuts[: pb.n_devices - 1].sum()), cap)
    if not most > top:
        return candidates
    steps = math.ceil(math.log(most / top) / math.log(NETWORK_GRID_RATIO))
    grid = top * NETWORK_GRID_RATIO ** np.arange(1, steps + 1)
    grid[-1] = most
    return np.concatenate([candidates, grid])


def _repair(
    inc: _Incumbent,
    base: _Weights,
    cap: float,
    m: _Metrics,
    deadline: float,
    *,
    network_cap: float = _INF,
) -> _Stages | None:
    """Lagrangian repair: add penalties for the bounds ``m`` violates until a run meets them.

    Returns the best feasible plan found (also offered to the incumbent), or None.
    """
    pb, bounds = inc.pb, inc.bounds
    if inc.repairs_left <= 0:
        return None
    inc.repairs_left -= 1
    net_cap = min(network_cap, bounds.bottleneck_s)
    period = max(m.bottleneck_s, pb.rate_period_s)

    def penalty(scale: float) -> _Weights:
        add = _Weights()
        if not _meets(m.latency_s, bounds.latency_s):
            add = add.plus(_Weights(latency=scale / bounds.latency_s))
        if pb.shared and not _meets(m.network_s, net_cap):
            add = add.plus(_Weights(network=scale / net_cap))
        if not _meets(m.energy_j, bounds.energy_j):
            add = add.plus(
                _Weights(energy=scale / bounds.energy_j, idle=scale * period / bounds.energy_j)
            )
        return add

    def ok(stages: _Stages | None) -> bool:
        if stages is None:
            return False
        mm = pb.metrics(stages)
        return pb.meets(mm, bounds) and _meets(mm.network_s, network_cap)

    base_value = max(
        base.latency * m.latency_s
        + base.network * m.network_s
        + base.energy * m.dynamic_j
        + base.idle * m.idle_w,
        1e-12,
    )
    best: _Stages | None = None
    lo_s, hi_s = 0.0, base_value
    for _ in range(14):  # grow the multiplier until the bounds are met
        if time.monotonic() > deadline:
            return None
        stages = _run(inc, base.plus(penalty(hi_s)), cap)
        inc.offer(stages)
        if ok(stages):
            best = stages
            break
        lo_s, hi_s = hi_s, hi_s * 4
    else:
        return None
    for _ in range(6):  # then shrink it towards the smallest that still works
        if time.monotonic() > deadline:
            break
        mid = math.sqrt(max(lo_s, hi_s / 64) * hi_s)
        stages = _run(inc, base.plus(penalty(mid)), cap)
        inc.offer(stages)
        if ok(stages):
            best, hi_s = stages, mid
        else:
            lo_s = mid
    return best


# ---------------------------------------------------------------------------------------------
# Public entry points


def brute_force(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
) -> Plan | None:
    """The optimum by enumeration of every split and ordered device choice (small inputs only).

    Scores plans with ``cost.evaluate`` directly, independently of the DP's arithmetic.
    """
    n = len(table.layers)
    if len(devices) > BRUTE_FORCE_MAX_DEVICES or n > BRUTE_FORCE_MAX_LAYERS:
        raise ValueError(
            f"brute force is for <= {BRUTE_FORCE_MAX_DEVICES} devices and "
            f"<= {BRUTE_FORCE_MAX_LAYERS} layers"
        )
    bounds = _Bounds.of(qoe, workload.batch)
    best: tuple[tuple[float, float], tuple[StagePlan, ...]] | None = None
    for count in range(1, min(n, len(devices)) + 1):
        for cuts in itertools.combinations(range(1, n), count - 1):
            edges = (0, *cuts, n)
            for order in itertools.permutations(devices, count):
                stages = tuple(
                    StagePlan(edges[k], edges[k + 1] - 1, (DeviceShare(order[k].node_id, 1.0),))
                    for k in range(count)
                )
                if not all(cost.fits(s, devices, table, workload) for s in stages):
                    continue
                if any(
                    network.link(a.node_id, b.node_id)[0] <= 0 for a, b in itertools.pairwise(order)
                ):
                    continue
                pc = cost.evaluate(stages, devices, table, network, workload)
                if not (
                    _meets(pc.latency_s, bounds.latency_s)
                    and _meets(pc.bottleneck_s, bounds.bottleneck_s)
                    and _meets(pc.energy_j, bounds.energy_j)
                ):
                    continue
                k = _objective_key(qoe.objective, pc.latency_s, pc.bottleneck_s, pc.energy_j)
                if best is None or k < best[0]:
                    best = (k, stages)
    if best is None:
        return None
    return _make_plan(best[1], devices, table, network, workload)


def best_plan(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    strategy: Strategy = "auto",
    time_limit_s: float | None = None,
) -> Plan:
    """The best single plan for ``qoe`` (see the module docstring for what "best" guarantees).

    Raises ``FailedPrecondition`` naming the binding constraint when memory or the QoE bounds
    rule every plan out.
    """
    if not devices:
        raise FailedPrecondition("no devices to plan on")
    limit = DEFAULT_TIME_LIMIT_S if time_limit_s is None else time_limit_s
    deadline = time.monotonic() + max(limit, 0.0)
    considered = _fastest(devices)
    pb = _Problem(considered, table, network, workload)
    bounds = _Bounds.of(qoe, workload.batch)
    objective = qoe.objective
    if workload.kind == "training":
        # A training step is synchronous, so its throughput is batch / step latency: the most
        # samples per second is the shortest step, and a throughput floor is a step-time bound.
        bounds = _Bounds(
            latency_s=min(bounds.latency_s, bounds.bottleneck_s),
            energy_j=bounds.energy_j,
        )
        if objective == "max_throughput":
            objective = "min_latency"
    stages, method, exact = _solve(pb, objective, bounds, strategy, deadline)
    if stages is None:
        raise FailedPrecondition(_explain(pb, qoe, bounds, deadline, len(devices)))
    _log.debug(
        "planned",
        objective=qoe.objective,
        method=method,
        exact=exact,
        devices=pb.node_ids(stages),
    )
    return _make_plan(_stage_plans(pb, stages), considered, table, network, workload)


def plan_set(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    max_plans: int = 4,
    strategy: Strategy = "auto",
    time_limit_s: float | None = None,
) -> PlanSet:
    """Up to ``max_plans`` QoE-compliant plans on disjoint device sets, best first.

    The first is ``best_plan``; each next one is the best plan on the devices no earlier plan
    uses, until none is left or none meets the QoE. The mix routes every microbatch to the first
    plan, except for ``max_throughput`` where the plans run side by side and share the load in
    proportion to their throughput.
    """
    limit = DEFAULT_TIME_LIMIT_S if time_limit_s is None else time_limit_s
    deadline = time.monotonic() + max(limit, 0.0)
    plans = [
        best_plan(devices, table, network, workload, qoe, strategy=strategy, time_limit_s=limit)
    ]
    used = set(plans[0].device_ids)
    while len(plans) < max_plans:
        remaining = [d for d in devices if d.node_id not in used]
        left = deadline - time.monotonic()
        if not remaining or left <= 0:
            break
        try:
            plan = best_plan(
                remaining, table, network, workload, qoe, strategy=strategy, time_limit_s=left
            )
        except FailedPrecondition:
            break
        plans.append(plan)
        used.update(plan.device_ids)
    if qoe.objective == "max_throughput":
        total = sum(p.predicted.throughput_sps for p in plans)
        mix = {p.plan_id: p.predicted.throughput_sps / total for p in plans}
    else:
        mix = {p.plan_id: (1.0 if k == 0 else 0.0) for k, p in enumerate(plans)}
    return PlanSet(plans=tuple(plans), mix=mix)


def _solve(
    pb: _Problem, objective: Objective, bounds: _Bounds, strategy: Strategy, deadline: float
) -> tuple[_Stages | None, str, bool]:
    """(stages, method used, provably optimal).

    ``auto`` runs the vectorised search (milliseconds on small inputs); when that cannot prove
    its answer and the input is small, the exact label DP gets ``LABEL_TIME_BUDGET_S`` to do so.
    """
    if strategy == "labels":
        try:
            return _label_dp(pb, objective, bounds, deadline), "labels", True
        except _Timeout:
            raise FailedPrecondition(
                "the exact planner ran out of time; raise time_limit_s"
            ) from None
    stages, exact = _vector_search(pb, objective, bounds, deadline)
    if exact or strategy == "vector" or pb.label_work() > LABEL_WORK_LIMIT:
        return stages, "vector", exact
    budget = min(deadline, time.monotonic() + LABEL_TIME_BUDGET_S)
    try:
        return _label_dp(pb, objective, bounds, budget), "labels", True
    except _Timeout:
        _log.info("exact label DP out of time; keeping the vectorised search's plan")
        return stages, "vector", False


def _fastest(devices: Sequence[DeviceProfile]) -> tuple[DeviceProfile, ...]:
    if len(devices) <= MAX_EXACT_DEVICES:
        return tuple(devices)
    ranked = sorted(devices, key=lambda d: (-d.gflops, -d.memory_bytes, d.node_id))
    kept = tuple(ranked[:MAX_EXACT_DEVICES])
    _log.info(
        "planning on the fastest devices only",
        considered=MAX_EXACT_DEVICES,
        fleet=len(devices),
        left_out=[d.node_id for d in ranked[MAX_EXACT_DEVICES:]],
    )
    return kept


def _stage_plans(pb: _Problem, stages: _Stages) -> tuple[StagePlan, ...]:
    return tuple(
        StagePlan(first, last, (DeviceShare(pb.devices[v].node_id, 1.0),))
        for first, last, v in stages
    )


def _make_plan(
    stages: tuple[StagePlan, ...],
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
) -> Plan:
    predicted = cost.predict(stages, devices, table, network, workload)
    flows: list[Flow] = []
    for before, after in itertools.pairwise(stages):
        for src in before.devices:
            for dst in after.devices:
                if src.id == dst.id:
                    continue
                flows.append(Flow(src=src.id, dst=dst.id))
                if workload.kind == "training":  # gradients flow back
                    flows.append(Flow(src=dst.id, dst=src.id))
    return Plan(
        plan_id=_plan_id(stages, workload.batch),
        stages=stages,
        microbatch=workload.batch,
        flows=tuple(flows),
        predicted=predicted,
    )


def _plan_id(stages: Sequence[StagePlan], microbatch: int) -> PlanId:
    """Content-derived id: the same plan gets the same id across re-plans."""
    text = ";".join(
        f"{s.first}-{s.last}:"
        + ",".join(f"{d.id}*{d.share:g}" + (f"@{d.mode}" if d.mode else "") for d in s.devices)
        for s in stages
    )
    digest = hashlib.sha256(f"{text}|{microbatch}".encode()).hexdigest()[:12]
    return PlanId(f"plan-{digest}")


# ---------------------------------------------------------------------------------------------
# Explanations


def _explain(pb: _Problem, qoe: QoESpec, bounds: _Bounds, deadline: float, fleet_size: int) -> str:
    """Why no plan exists: memory, or which QoE bound binds and by how much."""
    relaxed = _Bounds()
    among = f" (among the {pb.n_devices} fastest devices)" if fleet_size > pb.n_devices else ""
    any_plan = _vector_dp(pb, _Weights(latency=1.0))
    if any_plan is None:
        return _explain_memory(pb) + among
    reasons: list[str] = []
    alone: list[str] = []
    checks: list[tuple[Objective, str]] = []
    if qoe.latency_ms:
        checks.append(("min_latency", "latency_ms"))
    if qoe.min_throughput_sps:
        checks.append(("max_throughput", "min_throughput_sps"))
    if qoe.energy_j_per_sample:
        checks.append(("min_energy", "energy_j_per_sample"))
    for objective, name in checks:
        # A little past the deadline is worth a precise explanation.
        stages, _, _ = _solve(pb, objective, relaxed, "auto", max(deadline, time.monotonic() + 1))
        if stages is None:
            continue
        m = pb.metrics(stages)
        on = ",".join(pb.node_ids(stages))
        if name == "latency_ms":
            reached = f"{m.latency_s * 1e3:.1f} ms"
            missed = not _meets(m.latency_s, bounds.latency_s)
            bound = f"{name} {qoe.latency_ms:g}"
        elif name == "min_throughput_sps":
            reached = f"{pb.batch / m.bottleneck_s:.3g} samples/s"
            missed = not _meets(m.bottleneck_s, bounds.bottleneck_s)
            bound = f"{name} {qoe.min_throughput_sps:g}"
        else:
            reached = f"{m.energy_j / pb.batch:.4g} J/sample"
            missed = not _meets(m.energy_j, bounds.energy_j)
            bound = f"{name} {qoe.energy_j_per_sample:g}"
        verb = "needs" if name == "energy_j_per_sample" else "reaches"
        if missed:
            reasons.append(f"{bound} cannot be met: best plan {verb} {reached} (on devices {on})")
        else:
            alone.append(f"{bound} alone is met ({reached} on {on})")
    if reasons:
        return "; ".join(reasons) + among
    return (
        "the QoE bounds cannot all be met by one plan: " + "; ".join(alone) + among
        if alone
        else "no plan meets the QoE" + among
    )


def _explain_memory(pb: _Problem) -> str:
    n = pb.n_layers
    need = int(pb.memory[0, n - 1])
    params = sum(layer.param_bytes for layer in pb.table.layers)
    largest = max(pb.devices, key=lambda d: d.memory_bytes)
    total = sum(d.memory_bytes for d in pb.devices)
    text = (
        f"model needs {_fmt_bytes(need)} on one device (parameters {_fmt_bytes(params)}); "
        f"the largest device ({largest.node_id}) has {_fmt_bytes(largest.memory_bytes)} and the "
        f"fleet's total is {_fmt_bytes(total)}"
    )
    singles = [int(pb.memory[i, i]) for i in range(n)]
    worst = max(range(n), key=lambda i: singles[i])
    if singles[worst] > largest.memory_bytes:
        layer = pb.table.layers[worst]
        return text + f"; layer {worst} ({layer.name}) alone needs {_fmt_bytes(singles[worst])}"
    if not pb.shared and not pb.has_link.any():
        return text + "; and no two devices are linked"
    return text + "; no split into contiguous stages fits"


def _fmt_bytes(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


__all__ = [
    "MAX_EXACT_DEVICES",
    "Strategy",
    "best_plan",
    "brute_force",
    "plan_set",
]
