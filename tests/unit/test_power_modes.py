"""Power modes end to end in the pure parts: catalogue, cost model, planner, baselines, simulator.

A device in a lower power mode is a slower, more frugal variant of itself. The planner's
``min_energy`` search picks each used device's mode; brute force over every mode assignment
(and every split, device sequence and group, ``milp.brute_force``) is the oracle on small
instances. The simulator reads the mode from the plan on its own.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from doramesh.agent.catalogue import CATALOGUE
from doramesh.convert import (
    plan_from_json,
    plan_to_json,
    profile_from_pb,
    profile_to_pb,
    stage_from_pb,
    stage_to_pb,
)
from doramesh.errors import InvalidArgument
from doramesh.planner import api, cost, milp
from doramesh.scenario import load_scenario
from doramesh.scenario_types import Scenario
from doramesh.sim import simulate
from doramesh.types import (
    DeviceProfile,
    DeviceShare,
    LayerInfo,
    LayerTable,
    Link,
    Network,
    NodeId,
    Plan,
    PlanId,
    PowerMode,
    Prediction,
    QoESpec,
    StagePlan,
    Workload,
)

REL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _solver_stack() -> None:
    api.warm_up()


def moded(name: str, gflops: float, *, idle: float, active: float, speed: float, low_w: float,
          memory: float = 400e6) -> DeviceProfile:  # fmt: skip
    return DeviceProfile(
        node_id=NodeId(name),
        device_class="test",
        gflops=gflops,
        memory_bytes=int(memory),
        power_idle_w=idle,
        power_active_w=active,
        power_tx_w=0.5,
        power_modes=(PowerMode("top", 1.0, active), PowerMode("low", speed, low_w)),
    )


def table_of(*gflops: float, param_mb: float = 20, act_mb: float = 0.5) -> LayerTable:
    return LayerTable(
        "t",
        tuple(
            LayerInfo(f"l{i}", g, int(param_mb * 1e6), int(act_mb * 1e6))
            for i, g in enumerate(gflops)
        ),
        input_bytes=1000,
    )


# --- catalogue ----------------------------------------------------------------------------------


def test_catalogue_top_mode_keeps_the_class_figures_and_lower_modes_are_slower() -> None:
    with_modes = [c for c in CATALOGUE.values() if c.power_modes]
    assert len(with_modes) >= 5
    for c in with_modes:
        top, *lower = c.power_modes
        assert (top.speed_factor, top.power_active_w) == (1.0, c.power_active_w)
        assert lower
        for m in lower:
            assert 0 < m.speed_factor < 1
            assert c.power_idle_w <= m.power_active_w < c.power_active_w
            # The point of a lower mode: less energy above idle per GFLOP.
            assert (m.power_active_w - c.power_idle_w) / m.speed_factor < (
                c.power_active_w - c.power_idle_w
            )


def test_scenario_devices_get_their_class_modes_unless_their_figures_differ() -> None:
    text = """
name: t
devices:
  - {id: a, class: mini-pc}
  - {id: b, class: mini-pc, gflops: 100}
network: {kind: shared, bandwidth_mbps: 100}
model: {layers: [{name: l0, gflops: 1, param_mb: 1, activation_mb: 0.1}]}
workload: {kind: inference, batch: 1, rate_rps: 1}
qoe: {objective: min_energy}
"""
    sc = load_scenario(text)
    a, b = sc.devices
    assert a.power_modes == CATALOGUE["mini-pc"].power_modes
    assert b.power_modes == ()


# --- types, cost model, wire formats --------------------------------------------------------------


def test_cost_model_prices_a_share_at_its_mode() -> None:
    d = moded("a", 10.0, idle=1.0, active=9.0, speed=0.5, low_w=3.0)
    table = table_of(2.0, 2.0)
    workload = Workload("inference", 1, rate_rps=0.1)
    net = Network("shared", 100)
    top = cost.evaluate(
        [StagePlan(0, 1, (DeviceShare(d.node_id, 1.0),))], [d], table, net, workload
    )
    low = cost.evaluate(
        [StagePlan(0, 1, (DeviceShare(d.node_id, 1.0, "low"),))], [d], table, net, workload
    )
    assert top.latency_s == pytest.approx(0.4)
    assert low.latency_s == pytest.approx(0.8)
    # Period 10 s: idle 1 W over it plus the draw above idle while computing.
    assert top.energy_j == pytest.approx(10 * 1.0 + 8.0 * 0.4)
    assert low.energy_j == pytest.approx(10 * 1.0 + 2.0 * 0.8)
    with pytest.raises(ValueError, match="no power mode"):
        cost.evaluate(
            [StagePlan(0, 1, (DeviceShare(d.node_id, 1.0, "turbo"),))], [d], table, net, workload
        )
    e = replace(d, node_id=NodeId("e"))
    with pytest.raises(ValueError, match="two power modes"):
        cost.evaluate(
            [
                StagePlan(0, 0, (DeviceShare(d.node_id, 1.0, "low"),)),
                StagePlan(1, 1, (DeviceShare(e.node_id, 0.5), DeviceShare(d.node_id, 0.5))),
            ],
            [d, e],
            table,
            net,
            Workload("inference", 2),
        )


def test_modes_survive_the_wire_formats() -> None:
    d = moded("a", 10.0, idle=1.0, active=9.0, speed=0.5, low_w=3.0)
    assert profile_from_pb(profile_to_pb(d)) == d
    stage = StagePlan(0, 3, (DeviceShare(NodeId("a"), 0.5, "low"), DeviceShare(NodeId("b"), 0.5)))
    assert stage_from_pb(stage_to_pb(stage)) == stage
    plan = Plan(PlanId("p"), (stage,), 2, (), Prediction(1.0, 2.0, 3.0))
    assert plan_from_json(plan_to_json(plan)) == plan


def test_malformed_modes_are_rejected_naming_the_device() -> None:
    d = moded("a", 10.0, idle=1.0, active=9.0, speed=0.5, low_w=3.0)
    table = table_of(1.0)
    for bad in (
        replace(d, power_modes=(PowerMode("low", 0.5, 3.0),)),  # no top mode first
        replace(d, power_modes=(*d.power_modes, PowerMode("low", 0.4, 2.0))),  # name twice
        replace(d, power_modes=(d.power_modes[0], PowerMode("fast", 1.5, 12.0))),
    ):
        with pytest.raises(InvalidArgument, match="device a: power_modes"):
            api.plan([bad], table, Network(), Workload(), QoESpec("min_energy"))


# --- planner --------------------------------------------------------------------------------------


def brute_force_over_modes(
    devices: list[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    bounds: milp.Bounds,
) -> float | None:
    """Least energy over every mode assignment, each fleet enumerated by ``milp.brute_force``."""
    best: float | None = None
    for combo in itertools.product(*[[m.name for m in d.power_modes] for d in devices]):
        fleet = [d.in_mode(name) for d, name in zip(devices, combo, strict=True)]
        plan = milp.brute_force(fleet, table, network, workload, qoe, bounds=bounds)
        if plan is not None:
            energy = cost.evaluate(plan.stages, fleet, table, network, workload).energy_j
            best = energy if best is None else min(best, energy)
    return best


def test_min_energy_planner_equals_brute_force_over_modes() -> None:
    """On small random fleets of two-mode devices (a shared medium or per-pair links, one or two
    samples a request), the planner's first plan has the least energy any mode assignment,
    split, device sequence and data-parallel group reaches under the QoE, and its claims hold
    under the modes it names."""
    rng = random.Random("modes")
    used_low = 0
    for _ in range(16):
        devices = [
            moded(
                f"d{k}",
                rng.uniform(5, 40),
                idle=(idle := rng.uniform(0.5, 4)),
                active=(active := idle + rng.uniform(2, 12)),
                speed=(speed := rng.uniform(0.4, 0.9)),
                low_w=idle + (active - idle) * speed ** rng.uniform(1.2, 2.5),
                memory=rng.uniform(80e6, 300e6),
            )
            for k in range(rng.randint(1, 3))
        ]
        table = table_of(*(rng.uniform(0.1, 2) for _ in range(rng.randint(2, 5))))
        if rng.random() < 0.5:
            network = Network("shared", rng.uniform(50, 500), rng.uniform(0, 3))
        else:
            network = Network(
                "links",
                links=tuple(
                    Link(a.node_id, b.node_id, rng.uniform(20, 500), rng.uniform(0, 3))
                    for a, b in itertools.combinations(devices, 2)
                    if rng.random() < 0.85
                ),
            )
        batch = rng.choice([1, 2])  # two samples a request: data-parallel groups can pay
        workload = Workload("inference", batch, rate_rps=rng.choice([0.5, 2.0, 5.0]))
        top = [replace(d, power_modes=()) for d in devices]
        fastest = milp.brute_force(top, table, network, workload, QoESpec("min_latency"))
        if fastest is None:
            continue
        slo = fastest.predicted.latency_ms * rng.uniform(1.1, 2.5)
        qoe = QoESpec("min_energy", latency_ms=slo)
        bounds = milp.Bounds.of(qoe, batch).tightened(1.0 / workload.rate_rps)
        expected = brute_force_over_modes(devices, table, network, workload, qoe, bounds)
        report = api.plan_detailed(devices, table, network, workload, qoe, time_limit_s=20)
        first = report.plan_set.plans[0]
        if not report.keeps_up:
            assert expected is None
            continue
        assert expected is not None
        pc = cost.evaluate(first.stages, devices, table, network, workload)
        assert pc.energy_j == pytest.approx(expected, rel=REL)
        assert first.predicted.latency_ms <= slo * (1 + 1e-7)
        assert pc.latency_s * 1e3 == pytest.approx(first.predicted.latency_ms, rel=REL)
        used_low += any(s.mode for st in first.stages for s in st.devices)
    assert used_low >= 3  # the instances do exercise lower modes


def test_slack_is_traded_for_joules_and_tight_bounds_keep_the_top_mode() -> None:
    d = moded("a", 10.0, idle=1.0, active=9.0, speed=0.5, low_w=3.0)
    table = table_of(1.0, 1.0)
    workload = Workload("inference", 1, rate_rps=1.0)
    loose = api.plan([d], table, Network(), workload, QoESpec("min_energy", latency_ms=500))
    tight = api.plan([d], table, Network(), workload, QoESpec("min_energy", latency_ms=300))
    assert [s.mode for s in loose.plans[0].stages[0].devices] == ["low"]
    assert loose.plans[0].predicted.latency_ms == pytest.approx(400)
    assert [s.mode for s in tight.plans[0].stages[0].devices] == [""]
    assert (
        loose.plans[0].predicted.energy_j_per_sample < tight.plans[0].predicted.energy_j_per_sample
    )
    # min_latency and the baselines run devices flat out.
    fast = api.plan([d], table, Network(), workload, QoESpec("min_latency"))
    assert all(not s.mode for p in fast.plans for st in p.stages for s in st.devices)
    for name in api.BASELINE_NAMES:
        got = api.plan([d], table, Network(), workload, QoESpec("min_energy"), planner=name)
        assert all(not s.mode for p in got.plans for st in p.stages for s in st.devices), name


# --- simulator ------------------------------------------------------------------------------------


def test_simulator_runs_a_device_at_its_plans_mode() -> None:
    d = moded("a", 10.0, idle=1.0, active=9.0, speed=0.5, low_w=3.0)
    table = table_of(1.0, 1.0)
    sc = Scenario(
        name="t",
        devices=(d,),
        network=Network(),
        model=table,
        zoo_model=None,
        workload=Workload("inference", 1, rate_rps=1.0),
        qoe=QoESpec("min_energy"),
        dynamics=(),
    )

    def run(mode: str) -> tuple[float, float]:
        stage = StagePlan(0, 1, (DeviceShare(d.node_id, 1.0, mode),))
        p = Plan(PlanId("p"), (stage,), 1, (), Prediction(0.0, 0.0, 0.0))
        r = simulate(p, sc, requests=20, arrivals="periodic")
        return r.latency_ms, r.energy_j_per_sample

    top_ms, top_j = run("")
    low_ms, low_j = run("low")
    assert top_ms == pytest.approx(200.0)
    assert low_ms == pytest.approx(400.0)
    # 20 requests a second apart: the run lasts 19 s plus the last one's latency; the device
    # draws its mode's active power while computing and idle power for the rest.
    assert top_j == pytest.approx((20 * 9.0 * 0.2 + 1.0 * (19.2 - 20 * 0.2)) / 20)
    assert low_j == pytest.approx((20 * 3.0 * 0.4 + 1.0 * (19.4 - 20 * 0.4)) / 20)
