"""The runtime adapter's decision: how to share a model's requests among its live plans.

Pure: no gRPC, no I/O, no clock. The coordinator feeds it measurements (per device: speed
against its profile; per plan: EWMA latency) and applies what it decides (see
``doramesh.coordinator.mix``). The decision is a linear program over the plans' request rates
``y_p`` (samples/s), solved with CVXPY (HiGHS, else CLARABEL):

    max   sum_p y_p                          (objective max_throughput)
    min   sum_p cost_p * y_p                 (min_energy: J/sample; min_latency: ms)
          s.t. sum_p y_p >= demand           (the offered load, capped at 90% of what fits)
    s.t.  y_p <= capacity_p / slowest_p      (a plan runs at most as fast as its slowest device)
          sum_p u_pd * y_p <= 1   for every device d   (utilisation, where plans share devices)
          y_p = 0 for a plan with a dead device, or whose latency breaks the SLO
          y_p >= 0

``u_pd`` is device d's busy seconds per sample of plan p at its measured speed. The shares are
``y_p / sum(y)``, with a small probe floor so a plan pushed out still gets measured and can earn
its share back (a plan over the latency SLO gets nothing, probe included, until a re-plan).

Hysteresis, so the shares do not flap on noise:
  * a device's speed factor (measured seconds per GFLOP x profiled GFLOP/s; 1 = as profiled)
    is only *accepted* after ``SPEED_STREAK`` consecutive samples all deviate from the accepted
    value by more than ``SPEED_DEADBAND`` (25%); a plan's latency likewise;
  * new shares replace the current ones only if the LP's objective, evaluated for both under the
    accepted measurements, improves by more than ``MIN_GAIN`` (5%), or the current shares give
    load to a plan that can no longer take it (a dead device, an SLO broken): a membership
    change re-weights at once, without waiting for samples.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from doramesh.types import NodeId, Objective

#: Relative deviation of a sample from the accepted value that counts towards a change.
SPEED_DEADBAND = 0.25
#: Consecutive deviating samples before the new value is accepted.
SPEED_STREAK = 3
#: Relative improvement of the LP objective needed to move the shares.
MIN_GAIN = 0.05
#: Share every live plan keeps, so its speed is still measured after it was pushed out.
PROBE_SHARE = 0.03
#: With a demand to serve, plans are filled to at most this utilisation.
DEMAND_UTILISATION = 0.9


@dataclass(frozen=True, slots=True)
class PlanLoad:
    """What the adapter knows of one live plan (``key`` is its plan epoch)."""

    key: int
    #: Busy seconds per sample of each device of the plan, at its profiled speed.
    device_seconds: Mapping[NodeId, float]
    capacity_sps: float
    latency_ms: float
    energy_j_per_sample: float


@dataclass(frozen=True, slots=True)
class AdapterInput:
    plans: tuple[PlanLoad, ...]
    objective: Objective
    #: Accepted speed factor per device (missing = 1).
    slowdown: Mapping[NodeId, float] = field(default_factory=dict)
    alive: frozenset[NodeId] | None = None
    #: Accepted EWMA latency per plan (missing = the plan's prediction, slowed).
    latency_ms: Mapping[int, float] = field(default_factory=dict)
    latency_slo_ms: float | None = None
    #: Samples per second to serve (0 = unknown).
    demand_sps: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    shares: dict[int, float]
    #: The LP's objective for the new shares and for the current ones (same units).
    objective_new: float
    objective_old: float
    changed: bool
    reason: str


class Hysteresis:
    """Accepts a new value of a noisy measurement only after ``streak`` consecutive samples
    deviate from the accepted one by more than ``deadband`` (relative)."""

    def __init__(
        self, accepted: float, *, deadband: float = SPEED_DEADBAND, streak: int = SPEED_STREAK
    ) -> None:
        self.accepted = accepted
        self.deadband = deadband
        self.streak = streak
        self._run: list[float] = []

    def observe(self, sample: float) -> bool:
        """Feed one sample; True when the accepted value changed."""
        if not math.isfinite(sample) or sample <= 0:
            return False
        if abs(sample / self.accepted - 1.0) <= self.deadband:
            self._run.clear()
            return False
        # A run must keep one direction: noise around the value restarts it.
        if self._run and (sample > self.accepted) != (self._run[-1] > self.accepted):
            self._run.clear()
        self._run.append(sample)
        if len(self._run) < self.streak:
            return False
        recent = sorted(self._run[-self.streak :])
        self.accepted = recent[len(recent) // 2]
        self._run.clear()
        return True


def _slowest(plan: PlanLoad, slowdown: Mapping[NodeId, float]) -> float:
    return max((slowdown.get(d, 1.0) for d in plan.device_seconds), default=1.0)


def _usable(plan: PlanLoad, inp: AdapterInput) -> bool:
    if inp.alive is not None and any(d not in inp.alive for d in plan.device_seconds):
        return False
    return plan.capacity_sps > 0


def _latency(plan: PlanLoad, inp: AdapterInput) -> float:
    measured = inp.latency_ms.get(plan.key)
    if measured is not None:
        return measured
    return plan.latency_ms * _slowest(plan, inp.slowdown)


def _allowed(inp: AdapterInput) -> list[PlanLoad]:
    usable = [p for p in inp.plans if _usable(p, inp)]
    if inp.latency_slo_ms is None or not usable:
        return usable
    meeting = [p for p in usable if _latency(p, inp) <= inp.latency_slo_ms]
    # No plan meets the SLO: serve on the fastest rather than serve nothing.
    return meeting or [min(usable, key=lambda p: _latency(p, inp))]


def _cost(plan: PlanLoad, inp: AdapterInput) -> float:
    if inp.objective == "min_energy":
        return plan.energy_j_per_sample * _slowest(plan, inp.slowdown)
    return _latency(plan, inp)


def _capacity(plan: PlanLoad, inp: AdapterInput) -> float:
    return plan.capacity_sps / _slowest(plan, inp.slowdown)


def _devices(plans: list[PlanLoad]) -> list[NodeId]:
    return sorted({d for p in plans for d in p.device_seconds})


def throughput_of(shares: Mapping[int, float], inp: AdapterInput) -> float:
    """Samples/s the fleet serves when requests are split by ``shares`` (0 if a share goes to
    a plan that cannot take load)."""
    plans = {p.key: p for p in inp.plans}
    allowed = {p.key for p in _allowed(inp)}
    total = 0.0
    limit = math.inf
    busy: dict[NodeId, float] = {}
    for key, x in shares.items():
        if x <= 0:
            continue
        if key not in allowed or key not in plans:
            return 0.0
        p = plans[key]
        limit = min(limit, _capacity(p, inp) / x)
        for d, sec in p.device_seconds.items():
            busy[d] = busy.get(d, 0.0) + sec * inp.slowdown.get(d, 1.0) * x
        total += x
    if total <= 0:
        return 0.0
    for load in busy.values():
        if load > 0:
            limit = min(limit, 1.0 / load)
    return 0.0 if not math.isfinite(limit) else limit * total


def _objective_of(shares: Mapping[int, float], inp: AdapterInput, demand: float) -> float:
    """The LP objective reached by ``shares``: samples/s (max_throughput) or cost per second
    at ``demand`` (inf when the shares cannot serve it)."""
    throughput = throughput_of(shares, inp)
    if inp.objective == "max_throughput":
        return throughput
    if throughput + 1e-9 < demand:
        return math.inf
    plans = {p.key: p for p in inp.plans}
    total = sum(shares.values()) or 1.0
    return sum(_cost(plans[k], inp) * x / total * demand for k, x in shares.items() if x > 0)


def _cvxpy() -> Any:
    # Imported on first use (seconds): the coordinator warms it up when it starts adapting.
    return importlib.import_module("cvxpy")


def solve_rates(inp: AdapterInput) -> tuple[dict[int, float], float]:
    """The LP: samples/s per plan and the demand it was solved for (see the module docstring)."""
    cp = _cvxpy()

    plans = _allowed(inp)
    if not plans:
        return {}, 0.0
    y = cp.Variable(len(plans), nonneg=True)
    caps = [_capacity(p, inp) for p in plans]
    constraints = [y <= caps]
    for d in _devices(plans):
        coeffs = [p.device_seconds.get(d, 0.0) * inp.slowdown.get(d, 1.0) for p in plans]
        if sum(1 for c in coeffs if c > 0) > 1:  # a lone plan's device is bounded by its cap
            constraints.append(cp.sum(cp.multiply(coeffs, y)) <= 1.0)
    max_problem = cp.Problem(cp.Maximize(cp.sum(y)), constraints)
    _solve(max_problem)
    if y.value is None:
        return {}, 0.0
    best = float(max_problem.value)
    if inp.objective == "max_throughput":
        return {p.key: max(float(v), 0.0) for p, v in zip(plans, y.value, strict=True)}, best
    demand = inp.demand_sps if inp.demand_sps > 0 else 0.5 * best
    demand = min(demand, DEMAND_UTILISATION * best)
    costs = [_cost(p, inp) for p in plans]
    min_problem = cp.Problem(
        cp.Minimize(cp.sum(cp.multiply(costs, y))), [*constraints, cp.sum(y) >= demand]
    )
    _solve(min_problem)
    if y.value is None:
        return {}, demand
    return {p.key: max(float(v), 0.0) for p, v in zip(plans, y.value, strict=True)}, demand


def _solve(problem: Any) -> None:
    cp = _cvxpy()
    for solver in ("HIGHS", "CLARABEL"):
        if solver in cp.installed_solvers():
            problem.solve(solver=solver)
            return
    problem.solve()


def shares_from_rates(rates: Mapping[int, float], live: list[int]) -> dict[int, float]:
    """Rates to shares summing to 1, every live plan given at least ``PROBE_SHARE``."""
    total = sum(rates.values())
    if total <= 0:
        return {k: 1.0 / len(live) for k in live} if live else {}
    raw = {k: rates.get(k, 0.0) / total for k in live}
    floor = PROBE_SHARE if len(live) * PROBE_SHARE < 1 else 0.0
    lifted = {k: max(v, floor) for k, v in raw.items()}
    norm = sum(lifted.values())
    return {k: v / norm for k, v in lifted.items()}


def decide(current: Mapping[int, float], inp: AdapterInput, *, force: bool = False) -> Decision:
    """Re-solve; move the shares only by the hysteresis rule (or when ``force``d, or when the
    current shares load a plan that cannot take it)."""
    rates, demand = solve_rates(inp)
    live = [p.key for p in _allowed(inp)]
    new = shares_from_rates(rates, live)
    old_obj = _objective_of(current, inp, demand)
    new_obj = _objective_of(new, inp, demand)
    allowed = set(live)
    broken = any(x > 0 and k not in allowed for k, x in current.items()) or not current
    if force or broken:
        reason = "forced" if force else "a plan lost its devices or its QoE"
        return Decision(new, new_obj, old_obj, dict(current) != new, reason)
    if inp.objective == "max_throughput":
        gain = new_obj > old_obj * (1 + MIN_GAIN)
    else:
        gain = new_obj < old_obj * (1 - MIN_GAIN)
    if gain:
        return Decision(new, new_obj, old_obj, True, "objective improves")
    return Decision(dict(current), new_obj, old_obj, False, "within hysteresis")
