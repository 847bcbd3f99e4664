"""The runtime adapter's decision (pure): the LP over plan shares and its hysteresis."""

from __future__ import annotations

import pytest

from doramesh.coordinator import adapter
from doramesh.coordinator.adapter import AdapterInput, Hysteresis, PlanLoad, decide
from doramesh.types import NodeId

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


def load(key: int, devices: dict[NodeId, float], *, energy: float = 1.0) -> PlanLoad:
    """A plan whose capacity is set by its busiest device."""
    return PlanLoad(
        key=key,
        device_seconds=devices,
        capacity_sps=1.0 / max(devices.values()),
        latency_ms=100.0,
        energy_j_per_sample=energy,
    )


def test_shares_follow_capacity_and_move_off_a_slowed_device() -> None:
    plans = (load(1, {A: 0.1}), load(2, {B: 0.1}))
    even = decide({}, AdapterInput(plans, "max_throughput"))
    assert even.shares == pytest.approx({1: 0.5, 2: 0.5})
    slowed = decide(even.shares, AdapterInput(plans, "max_throughput", slowdown={A: 3.0}))
    assert slowed.changed
    assert slowed.shares[1] == pytest.approx(0.25)
    assert slowed.objective_new == pytest.approx(13.33, rel=1e-3)


def test_devices_shared_by_plans_are_not_overcommitted() -> None:
    # Plan 2 uses A too: A's utilisation caps the sum, so plan 1 (only A) gets nothing beyond
    # the probe share, and plan 2 keeps B busy.
    plans = (load(1, {A: 0.1}), load(2, {A: 0.05, B: 0.1}))
    decision = decide({}, AdapterInput(plans, "max_throughput"))
    rates, best = adapter.solve_rates(AdapterInput(plans, "max_throughput"))
    assert 0.1 * rates[1] + 0.05 * rates[2] <= 1.0 + 1e-6
    assert best == pytest.approx(15.0, rel=1e-3)
    assert sum(decision.shares.values()) == pytest.approx(1.0)


def test_small_gains_do_not_move_the_shares() -> None:
    plans = (load(1, {A: 0.1}), load(2, {B: 0.1}))
    current = {1: 0.5, 2: 0.5}
    # 4% slower on A: the LP would shift a little, but the objective gains < 5%.
    decision = decide(current, AdapterInput(plans, "max_throughput", slowdown={A: 1.04}))
    assert not decision.changed and decision.shares == current


def test_a_dead_device_reweights_at_once() -> None:
    plans = (load(1, {A: 0.1}), load(2, {B: 0.1}))
    decision = decide({1: 0.5, 2: 0.5}, AdapterInput(plans, "max_throughput", alive=frozenset({B})))
    assert decision.changed
    assert decision.shares == {2: 1.0}


def test_min_energy_serves_the_demand_on_the_cheapest_plans() -> None:
    plans = (load(1, {A: 0.1}, energy=5.0), load(2, {B: 0.1}, energy=1.0))
    decision = decide({}, AdapterInput(plans, "min_energy", demand_sps=8.0))
    # 8 samples/s fit on the cheap plan alone (capacity 10, filled to 90% at most).
    assert decision.shares[2] > 0.9
    more = decide({}, AdapterInput(plans, "min_energy", demand_sps=15.0))
    assert more.shares[1] > 0.3  # the cheap plan is full: the rest goes to the other


def test_latency_slo_excludes_a_plan_measured_too_slow() -> None:
    plans = (load(1, {A: 0.1}), load(2, {B: 0.1}))
    inp = AdapterInput(plans, "max_throughput", latency_ms={1: 900.0}, latency_slo_ms=500.0)
    decision = decide({1: 0.5, 2: 0.5}, inp)
    assert decision.changed
    assert decision.shares.get(1, 0.0) == 0.0  # until a re-plan: it is not probed either


def test_hysteresis_needs_a_streak_in_one_direction() -> None:
    h = Hysteresis(1.0)
    assert not h.observe(3.0)
    assert not h.observe(1.1)  # back inside the dead band: the run restarts
    assert not h.observe(3.0)
    assert not h.observe(0.5)  # the other direction: restarts too
    assert not h.observe(3.0)
    assert not h.observe(2.9)
    assert h.observe(3.1)
    assert h.accepted == pytest.approx(3.0)
    assert not h.observe(3.3)  # within 25% of the new value


def test_dispatch_follows_the_shares_microbatch_by_microbatch() -> None:
    from dataclasses import dataclass

    from doramesh.coordinator.mix import LiveSet
    from doramesh.types import QoESpec, Workload

    @dataclass
    class FakeDeployment:  # what LiveSet reads of a deployment
        plan_epoch: int

    live = LiveSet("m", 0, QoESpec(), Workload(), "doramesh", 2)
    for epoch in (1, 2):
        live.add(FakeDeployment(epoch), load(epoch, {A: 0.1}))  # type: ignore[arg-type]
    live.shares = {1: 0.25, 2: 0.75}
    picks = [live.pick().plan_epoch for _ in range(8)]
    assert picks.count(1) == 2 and picks.count(2) == 6
    # Smooth: never more than one microbatch away from the shares in any prefix.
    for n in range(1, 9):
        assert abs(picks[:n].count(1) - 0.25 * n) <= 1
    assert live.pick(exclude={2}).plan_epoch == 1
