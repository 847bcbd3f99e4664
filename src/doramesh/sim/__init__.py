"""The discrete-event simulator that scores every planner's plans.

It shares no code with the planner's analytical cost model (``doramesh.planner.cost``), so a
planner never grades itself: it simulates microbatches through stages on devices that are FIFO
servers, over a shared medium or per-pair links with token-bucket pacing, under the scenario's
dynamics. Pure Python, no I/O, deterministic for a seed. The modelling choices are listed in
``doramesh.sim.run``; the network model in ``doramesh.sim.network``; memory and the other
up-front checks in ``doramesh.sim.plans``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from doramesh.scenario_types import Scenario
from doramesh.sim.plans import PlanModel, build, infeasibility, split_samples
from doramesh.sim.result import SimResult
from doramesh.sim.run import (
    DEFAULT_REQUESTS,
    DYNAMICS_TAIL_S,
    Arrivals,
    RunLimits,
    Simulation,
)
from doramesh.types import Plan, PlanId, PlanSet

__all__ = ["SimResult", "simulate", "split_samples"]

#: Microbatches per stage a saturating (closed-loop) inference run keeps in flight per plan.
WINDOW_PER_STAGE = 2


def simulate(
    plans: Plan | PlanSet | Sequence[Plan],
    scenario: Scenario,
    *,
    mix: Mapping[str, float] | Mapping[PlanId, float] | None = None,
    duration_s: float | None = None,
    requests: int | None = None,
    seed: int = 0,
    pacing: bool = True,
    apply_dynamics: bool = True,
    arrivals: Arrivals = "poisson",
    window_per_stage: int = WINDOW_PER_STAGE,
) -> SimResult:
    """Simulate ``plans`` serving ``scenario``'s workload and report what a fleet would see.

    ``mix`` gives each plan's share of the requests by plan id (default: a ``PlanSet``'s own mix,
    else equal shares); plans with share 0 are not deployed. The run starts requests until
    ``requests`` have started or ``duration_s`` of simulated time has passed (whichever comes
    first), then drains. With neither, it makes ``DEFAULT_REQUESTS`` requests and, when dynamics
    apply, keeps going until ``DYNAMICS_TAIL_S`` after the last event, so that every event
    happens; an explicit ``requests`` or ``duration_s`` is obeyed even if it ends the run before
    some events. ``pacing=False`` ignores the plans' flow rates. ``arrivals`` picks Poisson (from
    ``seed``) or fixed-interval arrivals for workloads with a request rate.

    Raises ``ValueError`` for malformed input (a plan that does not cover the model's layers in
    order, an unknown device, a mix naming no plan); a plan set that cannot physically run
    (memory, a missing link) gives an infeasible result instead.
    """
    shares_by_id = None if mix is None else {str(k): float(v) for k, v in mix.items()}
    if isinstance(plans, Plan):
        plan_list: list[Plan] = [plans]
    elif isinstance(plans, PlanSet):
        plan_list = list(plans.plans)
        if shares_by_id is None and plans.mix:
            shares_by_id = {str(k): v for k, v in plans.mix.items()}
    else:
        plan_list = list(plans)
    if not plan_list:
        raise ValueError("no plans to simulate")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if window_per_stage < 1:
        raise ValueError(f"window_per_stage must be >= 1, got {window_per_stage}")
    shares = _shares(plan_list, shares_by_id)
    models: list[PlanModel] = []
    for plan, share in zip(plan_list, shares, strict=True):
        if share > 0:
            models.append(
                build(
                    plan,
                    len(models),
                    share,
                    scenario,
                    pacing=pacing,
                    window_per_stage=window_per_stage,
                )
            )
    limits = _limits(scenario, requests, duration_s, apply_dynamics)
    reason = infeasibility(models, scenario)
    if reason:
        return SimResult.infeasible(reason, requests=_nominal_requests(scenario, limits))
    simulation = Simulation(
        models, scenario, limits, seed=seed, arrivals=arrivals, apply_dynamics=apply_dynamics
    )
    return simulation.run()


def _shares(plans: Sequence[Plan], mix: Mapping[str, float] | None) -> list[float]:
    ids = [str(p.plan_id) for p in plans]
    if len(set(ids)) != len(ids):
        raise ValueError(f"plan ids must be unique, got {ids}")
    if mix is None:
        return [1.0] * len(plans)
    unknown = sorted(set(mix) - set(ids))
    if unknown:
        raise ValueError(f"mix names plans that are not given: {unknown}")
    shares = [float(mix.get(i, 0.0)) for i in ids]
    if any(s < 0 or not math.isfinite(s) for s in shares) or not sum(shares) > 0:
        raise ValueError(f"mix shares must be finite, >= 0 and not all 0, got {dict(mix)}")
    return shares


def _limits(
    scenario: Scenario, requests: int | None, duration_s: float | None, apply_dynamics: bool
) -> RunLimits:
    horizon = 0.0
    if apply_dynamics and scenario.dynamics:
        last = max(event.at_s for event in scenario.dynamics)
        horizon = last + max(DYNAMICS_TAIL_S, 0.25 * last)
    return RunLimits(requests=requests, duration_s=duration_s, horizon_s=horizon)


def _nominal_requests(scenario: Scenario, limits: RunLimits) -> int:
    """How many requests an infeasible run would have made, so all of them count as lost."""
    if limits.requests is not None:
        return limits.requests
    rate = scenario.workload.rate_rps
    if limits.duration_s is not None:
        if rate > 0 and scenario.workload.kind == "inference":
            return max(1, math.ceil(limits.duration_s * rate))
        return 1
    return DEFAULT_REQUESTS
