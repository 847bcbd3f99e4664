"""The hybrid partitioner (MILP), coarsening and the doramesh planner, against brute force.

Brute force (``milp.brute_force``) enumerates every contiguous split, every ordered sequence of
disjoint device groups and every whole-sample split, and scores plans with ``cost.evaluate``
alone, so it shares no arithmetic with the program.
"""

from __future__ import annotations

import math
import random
import time

import pytest
from planner_fixtures import MB, TIME_SLACK_S, device, uniform_table

from doramesh.errors import FailedPrecondition, InvalidArgument
from doramesh.planner import api, coarsen, cost, milp
from doramesh.types import (
    DeviceProfile,
    LayerInfo,
    LayerTable,
    Link,
    Network,
    NodeId,
    Objective,
    Plan,
    QoESpec,
    Workload,
)

OBJECTIVES: tuple[Objective, ...] = ("min_latency", "max_throughput", "min_energy")
REL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _solver_stack() -> None:
    """Import CVXPY once, outside the timed calls (a daemon does this at start)."""
    api.warm_up()


def random_instance(
    rng: random.Random, *, max_devices: int = 4, max_layers: int = 5, links: bool = False
) -> tuple[list[DeviceProfile], LayerTable, Network, Workload]:
    """Heterogeneous devices, layers and network, sized so that memory sometimes binds."""
    n_devices = rng.randint(1, max_devices)
    devices = []
    for k in range(n_devices):
        idle = rng.uniform(0.5, 5)
        devices.append(
            DeviceProfile(
                node_id=NodeId(f"d{k}"),
                device_class="random",
                gflops=rng.choice([rng.uniform(1, 50), 20.0]),  # some identical speeds
                memory_bytes=int(rng.uniform(60e6, 400e6)),
                power_idle_w=idle,
                power_active_w=idle + rng.uniform(0.5, 10),
                power_tx_w=rng.uniform(0.2, 2),
            )
        )
    layers = tuple(
        LayerInfo(
            f"l{i}",
            gflops=rng.uniform(0.05, 2),
            param_bytes=int(rng.uniform(5e6, 100e6)),
            activation_bytes=int(rng.uniform(1e4, 2e6)),
            workspace_bytes=int(rng.uniform(0, 1e6)),
        )
        for i in range(rng.randint(1, max_layers))
    )
    table = LayerTable("random", layers, input_bytes=100_000)
    if links:
        network = Network(
            "links",
            links=tuple(
                Link(NodeId(f"d{a}"), NodeId(f"d{b}"), rng.uniform(10, 500), rng.uniform(0, 5))
                for a in range(n_devices)
                for b in range(a + 1, n_devices)
                if rng.random() < 0.85
            ),
        )
    else:
        network = Network(
            "shared", bandwidth_mbps=rng.uniform(20, 500), latency_ms=rng.uniform(0, 5)
        )
    kind = "training" if rng.random() < 0.25 else "inference"
    workload = Workload(kind, batch=rng.choice([1, 2, 3]), rate_rps=rng.choice([0.0, 1.0, 10.0]))
    return devices, table, network, workload


def random_qoe(rng: random.Random, objective: Objective, reference: Plan | None) -> QoESpec:
    """Bounds near what the instance can reach, so that they bind some of the time."""
    if reference is None or rng.random() < 0.4:
        return QoESpec(objective)
    p = reference.predicted
    return QoESpec(
        objective,
        latency_ms=p.latency_ms * rng.uniform(1.0, 1.5) if rng.random() < 0.5 else None,
        min_throughput_sps=p.throughput_sps * rng.uniform(0.5, 1.0) if rng.random() < 0.5 else None,
        energy_j_per_sample=(
            p.energy_j_per_sample * rng.uniform(0.8, 1.5) if rng.random() < 0.3 else None
        ),
    )


def objective_of(
    plan: Plan,
    objective: Objective,
    devices: list[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
) -> float:
    pc = cost.evaluate(plan.stages, devices, table, network, workload)
    return milp.objective_value(objective, pc)


def assert_claims_hold(
    plan: Plan,
    devices: list[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
) -> None:
    """Covers the layers in order, distinct devices, whole-sample shares, fits memory, meets
    every QoE bound it claims (checked with ``cost.predict``)."""
    assert plan.stages[0].first == 0 and plan.stages[-1].last == len(table.layers) - 1
    for before, after in zip(plan.stages, plan.stages[1:], strict=False):
        assert after.first == before.last + 1
    ids = plan.device_ids
    assert len(set(ids)) == len(ids)
    for stage in plan.stages:
        assert math.isclose(sum(d.share for d in stage.devices), 1.0)
        for d in stage.devices:
            samples = d.share * plan.microbatch
            assert abs(samples - round(samples)) < 1e-9 and round(samples) >= 1
        assert cost.fits(stage, devices, table, workload)
    p = cost.predict(plan.stages, devices, table, network, workload)
    slack = 1 + 1e-7
    if qoe.latency_ms:
        assert p.latency_ms <= qoe.latency_ms * slack
    if qoe.min_throughput_sps:
        assert p.throughput_sps * slack >= qoe.min_throughput_sps
    if qoe.energy_j_per_sample:
        assert p.energy_j_per_sample <= qoe.energy_j_per_sample * slack


def same_value(expected: float | None, got: float | None) -> bool:
    if expected is None or got is None:
        return expected is None and got is None
    return abs(expected - got) <= REL * max(abs(expected), 1e-12)


# ---------------------------------------------------------------------------------------------
# The program equals brute force


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_partitioner_equals_brute_force_with_groups(objective: Objective) -> None:
    rng = random.Random(f"groups-{objective}")
    grouped = 0
    for _ in range(12):
        devices, table, network, workload = random_instance(rng)
        reference = milp.brute_force(devices, table, network, workload, QoESpec("min_latency"))
        qoe = random_qoe(rng, objective, reference)
        expected = milp.brute_force(devices, table, network, workload, qoe)
        got = milp.solve(devices, table, network, workload, qoe, time_limit_s=20)
        assert got.status in ("kOptimal", "kInfeasible", "no-columns"), got.status
        want = (
            None
            if expected is None
            else objective_of(expected, objective, devices, table, network, workload)
        )
        have = (
            None
            if got.plan is None
            else objective_of(got.plan, objective, devices, table, network, workload)
        )
        assert same_value(want, have), (qoe, workload, expected, got.plan)
        if got.plan is not None:
            assert_claims_hold(got.plan, devices, table, network, workload, qoe)
            grouped += any(len(s.devices) > 1 for s in got.plan.stages)
    if objective != "min_energy":  # replicas add idle draw: rarely the frugal choice
        assert grouped > 0, "no instance exercised a data-parallel group"


def test_partitioner_equals_brute_force_on_links() -> None:
    """Per-pair links are exact for single-device stages (one-sample microbatches)."""
    rng = random.Random("links")
    for k in range(12):
        devices, table, network, workload = random_instance(rng, links=True)
        workload = Workload(workload.kind, batch=1, rate_rps=workload.rate_rps)
        objective = OBJECTIVES[k % 3]
        qoe = QoESpec(objective)
        expected = milp.brute_force(devices, table, network, workload, qoe)
        got = milp.solve(devices, table, network, workload, qoe, time_limit_s=20)
        want = (
            None
            if expected is None
            else objective_of(expected, objective, devices, table, network, workload)
        )
        have = (
            None
            if got.plan is None
            else objective_of(got.plan, objective, devices, table, network, workload)
        )
        assert same_value(want, have), (workload, expected, got.plan)


def test_doramesh_planner_equals_brute_force_and_its_plans_keep_their_claims() -> None:
    """The whole planner (DP fast path + partitioner): its first plan is the optimum, and every
    plan in the set fits and meets the QoE.

    With a request rate the planner first asks its plan to keep up with it, so the optimum is
    the brute force's under that extra bound. For ``max_throughput`` the set may replace one
    pipeline by replicas side by side: what they serve together is then at least the best
    single plan's throughput.
    """
    rng = random.Random("planner")
    checked = 0
    for k in range(15):
        devices, table, network, workload = random_instance(rng)
        objective = OBJECTIVES[k % 3]
        reference = milp.brute_force(devices, table, network, workload, QoESpec("min_latency"))
        qoe = random_qoe(rng, objective, reference)
        bounds = milp.Bounds.of(qoe, workload.batch)
        if workload.rate_rps > 0:
            bounds = bounds.tightened(1.0 / workload.rate_rps)
        expected = milp.brute_force(devices, table, network, workload, qoe, bounds=bounds)
        try:
            report = api.plan_detailed(devices, table, network, workload, qoe, time_limit_s=20)
        except FailedPrecondition:
            assert milp.brute_force(devices, table, network, workload, qoe) is None
            continue
        result = report.plan_set
        for plan in result.plans:
            assert_claims_hold(plan, devices, table, network, workload, qoe)
        assert set(result.mix) == {p.plan_id for p in result.plans}
        assert math.isclose(sum(result.mix.values()), 1.0)
        if not report.keeps_up:
            assert expected is None
            continue
        assert expected is not None
        want = objective_of(expected, objective, devices, table, network, workload)
        if objective == "max_throughput" and workload.kind == "inference":
            live = sum(
                p.predicted.throughput_sps for p in result.plans if result.mix[p.plan_id] > 0
            )
            assert live * (1 + REL) >= workload.batch / want or workload.rate_rps > 0
            continue
        have = objective_of(result.plans[0], objective, devices, table, network, workload)
        assert same_value(want, have), (qoe, workload, expected.stages, result.plans[0].stages)
        checked += 1
    assert checked >= 5


def test_groups_are_used_where_they_help() -> None:
    """Two equal devices and a four-sample microbatch: one data-parallel stage halves latency."""
    devices = [device("a", 20), device("b", 20)]
    table = uniform_table(4, act_mb=2.0)
    workload = Workload("inference", batch=4)
    result = api.plan(devices, table, Network("shared", 100), workload, QoESpec("min_latency"))
    first = result.plans[0]
    assert len(first.stages) == 1 and {d.id for d in first.stages[0].devices} == {"a", "b"}
    assert [d.share for d in first.stages[0].devices] == [0.5, 0.5]
    assert math.isclose(first.predicted.latency_ms, 4 * 1.0 * 2 / 20 * 1e3)


def test_min_energy_leaves_costly_devices_out() -> None:
    """A device that would only add idle draw stays out of the energy-optimal plan."""
    devices = [
        device("frugal", 20, idle=0.5, active=4.0),
        device("hungry", 40, idle=8.0, active=30.0),
    ]
    table = uniform_table(6)
    workload = Workload("inference", batch=2, rate_rps=1.0)
    result = api.plan(devices, table, Network("shared", 100), workload, QoESpec("min_energy"))
    assert result.plans[0].device_ids == ("frugal",)


def test_battery_budget_is_respected() -> None:
    """A phone that would drain its battery in under the budget's hours gets less work (here:
    one layer, at a slower pace), and the plan is still the best one that respects it."""
    phone = device("phone", 50, idle=0.5, active=6.0, battery_wh=3.0)
    box = device("box", 10, idle=2.0, active=10.0)
    fleet = [phone, box]
    table = uniform_table(4)
    network = Network("shared", 100)
    workload = Workload("inference", batch=1, rate_rps=5.0)
    qoe = QoESpec("min_latency")
    free = milp.solve(fleet, table, network, workload, qoe, time_limit_s=10)
    assert free.plan is not None and free.plan.device_ids == ("phone",)
    assert milp.device_power_w(free.plan.stages, fleet, table, network, workload)["phone"] > 1.5
    capped = milp.solve(fleet, table, network, workload, qoe, time_limit_s=10, battery_hours=2.0)
    assert capped.plan is not None
    power = milp.device_power_w(capped.plan.stages, fleet, table, network, workload)
    assert power.get(NodeId("phone"), 0.0) <= 3.0 / 2.0 * (1 + 1e-9)
    expected = milp.brute_force(fleet, table, network, workload, qoe, battery_hours=2.0)
    assert expected is not None
    assert math.isclose(expected.predicted.latency_ms, capped.plan.predicted.latency_ms)


def test_warm_start_is_kept_when_nothing_beats_it() -> None:
    devices = [device("a", 20), device("b", 10)]
    table = uniform_table(4)
    workload = Workload("inference", batch=1)
    best = milp.brute_force(
        devices, table, Network("shared", 100), workload, QoESpec("min_latency")
    )
    assert best is not None
    got = milp.solve(
        devices,
        table,
        Network("shared", 100),
        workload,
        QoESpec("min_latency"),
        warm_start=best.stages,
        time_limit_s=10,
    )
    assert got.warm_started and got.plan is not None
    assert got.plan.predicted.latency_ms <= best.predicted.latency_ms * (1 + REL)
    # With no time to solve, the warm start comes back as it is.
    rushed = milp.solve(
        devices,
        table,
        Network("shared", 100),
        workload,
        QoESpec("min_latency"),
        warm_start=best.stages,
        time_limit_s=1e-3,
    )
    assert rushed.plan is not None and rushed.plan.stages == best.stages


# ---------------------------------------------------------------------------------------------
# Infeasible QoE: the explanation


def test_impossible_latency_names_the_bound_the_gap_and_the_closest_plan() -> None:
    devices = [device("a", 10), device("b", 5)]
    table = uniform_table(6)  # 6 GFLOP: at least 600 ms on the fastest device
    qoe = QoESpec("min_energy", latency_ms=300)
    with pytest.raises(api.QoEUnreachable) as caught:
        api.plan(devices, table, Network("shared", 100), Workload(), qoe)
    message = caught.value.message
    assert "qoe.latency_ms 300 cannot be met" in message
    assert "600.0 ms" in message and "100.0%" in message and "over" in message
    assert "closest plan" in message
    closest = caught.value.closest
    assert closest is not None and math.isclose(closest.predicted.latency_ms, 600.0)


def test_impossible_throughput_and_joint_bounds_are_explained() -> None:
    devices = [device("a", 10, idle=1.0, active=2.0), device("b", 10, idle=1.0, active=2.0)]
    table = uniform_table(4)
    with pytest.raises(
        FailedPrecondition, match=r"qoe\.min_throughput_sps 100 cannot be met.*short"
    ):
        api.plan(
            devices, table, Network("shared", 100), Workload(), QoESpec(min_throughput_sps=100)
        )
    # Each bound alone is reachable, both at once are not: say so, and name the closest plan.
    fast = api.plan(devices, table, Network("shared", 1000), Workload(), QoESpec("max_throughput"))
    best_tput = fast.plans[0].predicted.throughput_sps
    frugal = api.plan(devices, table, Network("shared", 1000), Workload(), QoESpec("min_energy"))
    least_energy = frugal.plans[0].predicted.energy_j_per_sample
    both = QoESpec(min_throughput_sps=best_tput * 0.99, energy_j_per_sample=least_energy * 1.01)
    try:
        api.plan(devices, table, Network("shared", 1000), Workload(), both)
    except api.QoEUnreachable as err:
        assert "cannot all be met" in err.message and "closest plan" in err.message
        assert err.closest is not None


def test_memory_infeasibility_names_sizes() -> None:
    devices = [device("a", 10, memory_mb=15), device("b", 10, memory_mb=15)]
    with pytest.raises(
        FailedPrecondition, match=r"memory: the model needs .* layer \d \(l\d\) alone needs"
    ):
        api.plan(
            devices, uniform_table(3, param_mb=20), Network("shared", 100), Workload(), QoESpec()
        )


def test_unknown_planner_lists_the_known_ones() -> None:
    with pytest.raises(InvalidArgument, match="unknown planner 'oracle'; known planners: doramesh"):
        api.plan(
            [device("a", 1)], uniform_table(1), Network(), Workload(), QoESpec(), planner="oracle"
        )


# ---------------------------------------------------------------------------------------------
# Time limits and coarsening


def big_instance(devices: int, layers: int) -> tuple[list[DeviceProfile], LayerTable]:
    rng = random.Random(f"big-{devices}-{layers}")
    fleet = [
        device(
            f"d{k}",
            rng.choice([12, 38, 52, 71, 126, 178, 384]),
            rng.choice([3000, 6000, 12000]),
            idle=rng.choice([0.5, 1.6, 2.8, 5.5]),
            active=rng.choice([6, 14, 25, 41]),
        )
        for k in range(devices)
    ]
    table = LayerTable(
        "big",
        tuple(
            LayerInfo(
                f"b{i}",
                rng.uniform(0.4, 1.6),
                int(rng.uniform(15, 45) * MB),
                int(rng.choice((0.2, 0.4, 1.6)) * MB),
            )
            for i in range(layers)
        ),
        input_bytes=200_000,
    )
    return fleet, table


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_time_limit_is_never_exceeded(objective: Objective) -> None:
    fleet, table = big_instance(16, 64)
    for workload in (Workload("inference", 1, 2.0), Workload("inference", 8)):
        start = time.perf_counter()
        result = api.plan(
            fleet, table, Network("shared", 200, 3), workload, QoESpec(objective), time_limit_s=0.5
        )
        assert time.perf_counter() - start <= 0.5 + TIME_SLACK_S
        assert result.plans


def test_partitioner_reports_its_gap_under_a_time_limit() -> None:
    fleet, table = big_instance(12, 48)
    co = coarsen.coarsen(table, 16)
    start = time.perf_counter()
    got = milp.solve(
        fleet,
        table,
        Network("shared", 200, 3),
        Workload("inference", 8),
        QoESpec("max_throughput"),
        coarsening=co,
        time_limit_s=0.4,
    )
    assert time.perf_counter() - start <= 0.4 + TIME_SLACK_S
    if got.status == "kOptimal":
        assert got.gap == 0.0
    elif got.gap is not None:
        assert 0.0 <= got.gap <= 1.0


def test_coarsening_keeps_flops_and_never_underestimates_memory() -> None:
    _, table = big_instance(2, 60)
    co = coarsen.coarsen(table, 12)
    assert len(co.blocks) == 12 and not co.exact
    assert co.blocks[0][0] == 0 and co.blocks[-1][1] == 59
    assert all(b[0] == a[1] + 1 for a, b in zip(co.blocks, co.blocks[1:], strict=False))
    assert 0 < co.max_block_gflops_fraction < 0.2
    for workload in (Workload("inference", 2), Workload("training", 4)):
        coarse = coarsen.coarse_table(table, co, workload)
        assert math.isclose(
            sum(cost.layer_gflops(coarse, workload.kind)),
            sum(cost.layer_gflops(table, workload.kind)),
        )
        for i in range(len(co.blocks)):
            for j in range(i, len(co.blocks)):
                first, last = co.layer_range(i, j)
                real = cost.stage_memory_bytes(
                    table, first, last, samples=workload.batch, kind=workload.kind
                )
                model = cost.stage_memory_bytes(
                    coarse, i, j, samples=workload.batch, kind=workload.kind
                )
                assert model >= real
                if workload.kind == "training":
                    assert model - real <= 4 * (j - i + 1)  # rounding only
    small = uniform_table(5)
    assert coarsen.coarsen(small, 12).exact


def test_planning_report_names_methods_and_gap() -> None:
    fleet, table = big_instance(8, 40)
    report = api.plan_detailed(
        fleet,
        table,
        Network("shared", 200, 3),
        Workload("inference", 4),
        QoESpec("min_latency"),
        time_limit_s=2.0,
    )
    assert report.seconds <= 2.0
    assert set(report.methods) == {p.plan_id for p in report.plan_set.plans}
    assert "blocks" in report.coarsening
    assert report.milp_status is None or report.milp_gap is None or 0 <= report.milp_gap <= 1
