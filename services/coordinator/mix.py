"""A model's live plans and how its requests are split among them.

Several plans of one model run at once, each with its own plan epoch and stages on the agents.
The coordinator picks a plan per request (per microbatch) by the adapter's shares with smooth
weighted round robin: deterministic, and within one request of the shares over any window.
Each plan's latency and throughput are measured here, each device's speed by the adapter loop;
re-weighting is the pure decision in ``doramesh.coordinator.adapter``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from doramesh.coordinator import adapter
from doramesh.errors import FailedPrecondition
from doramesh.types import NodeId, QoESpec, Workload

if TYPE_CHECKING:
    from doramesh.coordinator.deploy import Deployment

#: Weight of the newest request in a plan's latency EWMA.
LATENCY_EWMA_ALPHA = 0.2
#: Window over which a plan's throughput is measured.
THROUGHPUT_WINDOW_S = 2.0
#: Re-weights remembered per model.
MAX_REWEIGHTS = 256


@dataclass(frozen=True, slots=True)
class Reweight:
    at: float  # time.monotonic()
    reason: str
    shares: dict[int, float]
    objective_old: float
    objective_new: float


@dataclass(slots=True)
class PlanStats:
    inflight: int = 0
    #: Set while no request is in flight on the plan (a retired plan drains until then).
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    ewma_latency_ms: float | None = None
    completions: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    latency: adapter.Hysteresis | None = None

    def throughput(self, now: float) -> float:
        while self.completions and now - self.completions[0] > THROUGHPUT_WINDOW_S:
            self.completions.popleft()
        return len(self.completions) / THROUGHPUT_WINDOW_S


@dataclass(slots=True)
class LiveSet:
    """The live plans of one model (by plan epoch, best first) and their shares."""

    model: str
    seed: int
    qoe: QoESpec
    workload: Workload
    planner: str
    max_plans: int
    plans: dict[int, Deployment] = field(default_factory=dict)
    loads: dict[int, adapter.PlanLoad] = field(default_factory=dict)
    shares: dict[int, float] = field(default_factory=dict)
    stats: dict[int, PlanStats] = field(default_factory=dict)
    #: Accepted speed factor per device (1 = as profiled), and its hysteresis.
    speed: dict[NodeId, adapter.Hysteresis] = field(default_factory=dict)
    reweights: deque[Reweight] = field(default_factory=lambda: deque(maxlen=MAX_REWEIGHTS))
    replans: int = 0
    #: Requests replayed on another plan after a failure (over every plan set of the model).
    replayed: int = 0
    #: The accepted plan latencies the shares were last solved with.
    solved_latencies: tuple[tuple[int, float | None], ...] = ()
    #: When re-weighting last failed the QoE and a re-plan was asked for (monotonic).
    qoe_replan_at: float = -math.inf
    #: Seconds from each re-planning's trigger until its plans were live.
    replan_live_s: list[float] = field(default_factory=list)
    #: The client gave these plans: a missed QoE re-weights them but does not re-plan (only
    #: agents that died do).
    given: bool = False
    _credit: dict[int, float] = field(default_factory=dict)
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=4096))

    @property
    def primary(self) -> Deployment:
        return next(iter(self.plans.values()))

    def slowdown(self) -> dict[NodeId, float]:
        return {d: h.accepted for d, h in self.speed.items()}

    def add(self, dep: Deployment, load: adapter.PlanLoad) -> None:
        self.plans[dep.plan_epoch] = dep
        self.loads[dep.plan_epoch] = load
        self.stats[dep.plan_epoch] = stats = PlanStats()
        stats.idle.set()
        self._credit[dep.plan_epoch] = 0.0

    def remove(self, epoch: int) -> Deployment | None:
        dep = self.plans.pop(epoch, None)
        self.loads.pop(epoch, None)
        self.shares.pop(epoch, None)
        self._credit.pop(epoch, None)
        return dep

    def pick(self, exclude: frozenset[int] | set[int] = frozenset()) -> Deployment:
        """The next request's plan: smooth weighted round robin over the shares."""
        candidates = {k: s for k, s in self.shares.items() if k in self.plans and k not in exclude}
        if not candidates or sum(candidates.values()) <= 0:
            candidates = {k: 1.0 for k in self.plans if k not in exclude}
        if not candidates:
            raise FailedPrecondition(f"no live plan of {self.model!r} can take the request")
        total = sum(candidates.values())
        for k, s in candidates.items():
            self._credit[k] = self._credit.get(k, 0.0) + s
        key = max(candidates, key=lambda k: self._credit[k])
        self._credit[key] -= total
        now = time.monotonic()
        self.arrivals.append(now)
        return self.plans[key]

    def started(self, dep: Deployment) -> None:
        stats = self.stats.setdefault(dep.plan_epoch, PlanStats())
        stats.inflight += 1
        stats.idle.clear()

    def finished(self, dep: Deployment, latency_ms: float | None) -> None:
        stats = self.stats.setdefault(dep.plan_epoch, PlanStats())
        stats.inflight -= 1
        if stats.inflight <= 0:
            stats.idle.set()
        if latency_ms is None:
            return
        stats.completions.append(time.monotonic())
        if stats.ewma_latency_ms is None:
            stats.ewma_latency_ms = latency_ms
        else:
            a = LATENCY_EWMA_ALPHA
            stats.ewma_latency_ms = a * latency_ms + (1 - a) * stats.ewma_latency_ms
        if stats.latency is None:
            stats.latency = adapter.Hysteresis(latency_ms)
        else:
            stats.latency.observe(stats.ewma_latency_ms)

    def demand_sps(self, now: float) -> float:
        if self.workload.rate_rps > 0:
            return self.workload.rate_rps * self.workload.batch
        while self.arrivals and now - self.arrivals[0] > THROUGHPUT_WINDOW_S:
            self.arrivals.popleft()
        return len(self.arrivals) / THROUGHPUT_WINDOW_S

    def adapter_input(self, alive: frozenset[NodeId] | None) -> adapter.AdapterInput:
        latency = {
            k: s.latency.accepted
            for k, s in self.stats.items()
            if k in self.plans and s.latency is not None
        }
        return adapter.AdapterInput(
            plans=tuple(self.loads[k] for k in self.plans),
            objective=self.qoe.objective,
            slowdown=self.slowdown(),
            alive=alive,
            latency_ms=latency if self.qoe.latency_ms else {},
            latency_slo_ms=self.qoe.latency_ms,
            demand_sps=self.demand_sps(time.monotonic()),
        )

    def reweight(
        self,
        alive: frozenset[NodeId] | None,
        reason: str,
        *,
        force: bool = False,
        solve: Callable[
            [Mapping[int, float], adapter.AdapterInput, bool], adapter.Decision
        ] = lambda cur, inp, force: adapter.decide(cur, inp, force=force),
    ) -> adapter.Decision:
        """Re-solve the shares now; apply them if the hysteresis rule (or ``force``) says so."""
        decision = solve(self.shares, self.adapter_input(alive), force)
        if decision.changed:
            self.shares = decision.shares
            self.reweights.append(
                Reweight(
                    time.monotonic(),
                    f"{reason}: {decision.reason}",
                    dict(decision.shares),
                    decision.objective_old,
                    decision.objective_new,
                )
            )
        return decision
