"""The planner's cost model and dynamic programs, checked against brute force and by hand."""

from __future__ import annotations

import math
import random
import time

import pytest
from planner_fixtures import MB, device, uniform_table

from doramesh.errors import FailedPrecondition, InvalidArgument
from doramesh.planner import api, cost, dp
from doramesh.types import (
    DeviceProfile,
    DeviceShare,
    LayerInfo,
    LayerTable,
    Link,
    Network,
    NodeId,
    Objective,
    Plan,
    QoESpec,
    StagePlan,
    Workload,
)

OBJECTIVES: tuple[Objective, ...] = ("min_latency", "max_throughput", "min_energy")


def random_instance(
    rng: random.Random, *, max_devices: int = 4, max_layers: int = 7
) -> tuple[list[DeviceProfile], LayerTable, Network, Workload]:
    """Heterogeneous devices (speed, memory, power), layers and network, sized so memory binds."""
    n_devices = rng.randint(1, max_devices)
    devices = []
    for k in range(n_devices):
        idle = rng.uniform(0.5, 5)
        devices.append(
            DeviceProfile(
                node_id=NodeId(f"d{k}"),
                device_class="random",
                gflops=rng.uniform(1, 50),
                memory_bytes=int(rng.uniform(50e6, 400e6)),
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
    if rng.random() < 0.5:
        network = Network(
            "shared", bandwidth_mbps=rng.uniform(20, 500), latency_ms=rng.uniform(0, 5)
        )
    else:
        links = tuple(
            Link(NodeId(f"d{a}"), NodeId(f"d{b}"), rng.uniform(10, 500), rng.uniform(0, 5))
            for a in range(n_devices)
            for b in range(a + 1, n_devices)
            if rng.random() < 0.85
        )
        network = Network("links", links=links)
    kind = "training" if rng.random() < 0.2 else "inference"
    workload = Workload(
        kind, batch=rng.choice([1, 2, 4]), rate_rps=rng.choice([0.0, 0.0, 1.0, 10.0])
    )
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
        energy_j_per_sample=p.energy_j_per_sample * rng.uniform(0.8, 1.5)
        if rng.random() < 0.3
        else None,
    )


def score(plan: Plan, objective: Objective) -> float:
    p = plan.predicted
    if objective == "min_latency":
        return p.latency_ms
    if objective == "max_throughput":
        return -p.throughput_sps
    return p.energy_j_per_sample


def solve(
    devices: list[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    strategy: dp.Strategy,
) -> Plan | None:
    try:
        return dp.best_plan(devices, table, network, workload, qoe, strategy=strategy)
    except FailedPrecondition:
        return None


def assert_valid(
    plan: Plan,
    devices: list[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
) -> None:
    """Covers the layers in order, distinct devices, fits memory, meets every QoE bound."""
    assert plan.stages[0].first == 0 and plan.stages[-1].last == len(table.layers) - 1
    for before, after in zip(plan.stages, plan.stages[1:], strict=False):
        assert after.first == before.last + 1
    ids = plan.device_ids
    assert len(set(ids)) == len(ids)
    for stage in plan.stages:
        assert cost.fits(stage, devices, table, workload)
    p = plan.predicted
    assert p == cost.predict(plan.stages, devices, table, network, workload)
    slack = 1 + 1e-7
    if qoe.latency_ms:
        assert p.latency_ms <= qoe.latency_ms * slack
    if qoe.min_throughput_sps:
        assert p.throughput_sps * slack >= qoe.min_throughput_sps
    if qoe.energy_j_per_sample:
        assert p.energy_j_per_sample <= qoe.energy_j_per_sample * slack
    assert plan.microbatch == workload.batch
    expected_flows = sum(1 for _ in zip(plan.stages, plan.stages[1:], strict=False))
    expected_flows *= 2 if workload.kind == "training" else 1
    assert len(plan.flows) == expected_flows


# ---------------------------------------------------------------------------------------------
# The exact searches equal brute force


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("strategy", ["auto", "labels"])
def test_exact_search_equals_brute_force(objective: Objective, strategy: dp.Strategy) -> None:
    rng = random.Random(f"{objective}-{strategy}")
    feasible = 0
    for _ in range(30):
        devices, table, network, workload = random_instance(rng)
        reference = dp.brute_force(devices, table, network, workload, QoESpec("min_latency"))
        qoe = random_qoe(rng, objective, reference)
        expected = dp.brute_force(devices, table, network, workload, qoe)
        got = solve(devices, table, network, workload, qoe, strategy)
        assert (got is None) == (expected is None), (qoe, expected, got)
        if got is None or expected is None:
            continue
        feasible += 1
        assert score(got, objective) == pytest.approx(score(expected, objective), rel=1e-7)
        assert_valid(got, devices, table, network, workload, qoe)
    assert feasible >= 10  # the instances are not all infeasible


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_vectorised_search_without_bounds(objective: Objective) -> None:
    """The vectorised search alone: exact for latency and throughput, within the gap for energy."""
    rng = random.Random(f"vector-{objective}")
    for _ in range(30):
        devices, table, network, workload = random_instance(rng)
        qoe = QoESpec(objective)
        expected = dp.brute_force(devices, table, network, workload, qoe)
        got = solve(devices, table, network, workload, qoe, "vector")
        assert (got is None) == (expected is None)
        if got is None or expected is None:
            continue
        tolerance = 1e-7 if objective != "min_energy" else dp.ENERGY_GAP * 1.01
        assert score(got, objective) == pytest.approx(score(expected, objective), rel=tolerance)
        assert_valid(got, devices, table, network, workload, qoe)


def test_vectorised_search_with_bounds_is_feasible() -> None:
    """With bounds the vectorised search may be a heuristic, but what it returns is valid."""
    rng = random.Random("vector-bounds")
    for _ in range(40):
        devices, table, network, workload = random_instance(rng)
        reference = dp.brute_force(devices, table, network, workload, QoESpec("min_latency"))
        objective = rng.choice(OBJECTIVES)
        qoe = random_qoe(rng, objective, reference)
        expected = dp.brute_force(devices, table, network, workload, qoe)
        got = solve(devices, table, network, workload, qoe, "vector")
        if got is None:
            continue
        assert expected is not None  # never a plan where none exists
        assert_valid(got, devices, table, network, workload, qoe)
        assert score(got, objective) >= score(expected, objective) - 1e-9 * abs(
            score(expected, objective)
        )


def test_search_arithmetic_matches_cost_model() -> None:
    rng = random.Random("metrics")
    for _ in range(40):
        devices, table, network, workload = random_instance(rng)
        problem = dp._Problem(devices, table, network, workload)
        plan = dp.brute_force(devices, table, network, workload, QoESpec("min_energy"))
        if plan is None:
            continue
        index = {d.node_id: k for k, d in enumerate(devices)}
        stages = tuple((s.first, s.last, index[s.devices[0].id]) for s in plan.stages)
        m = problem.metrics(stages)
        pc = cost.evaluate(plan.stages, devices, table, network, workload)
        assert m.latency_s == pytest.approx(pc.latency_s, rel=1e-9)
        assert m.bottleneck_s == pytest.approx(pc.bottleneck_s, rel=1e-9)
        assert m.energy_j == pytest.approx(pc.energy_j, rel=1e-9)
        for first, last, _ in stages:
            assert problem.memory[first, last] == cost.stage_memory_bytes(
                table, first, last, samples=workload.batch, kind=workload.kind
            )


# ---------------------------------------------------------------------------------------------
# Memory, QoE and explanations


def test_memory_forces_a_split_and_is_respected() -> None:
    devices = [device("big", 100, memory_mb=60), device("small", 50, memory_mb=60)]
    table = uniform_table(8, param_mb=10)  # 80 MB of parameters: no device holds it alone
    plan = dp.best_plan(devices, table, Network(), Workload(), QoESpec("min_latency"))
    assert len(plan.stages) == 2
    for stage in plan.stages:
        assert cost.fits(stage, devices, table, Workload())


def test_model_too_big_names_sizes() -> None:
    devices = [device("a", 10, memory_mb=1000), device("b", 10, memory_mb=1500)]
    table = uniform_table(10, param_mb=320)  # 3.2 GB
    with pytest.raises(FailedPrecondition) as err:
        dp.best_plan(devices, table, Network(), Workload(), QoESpec())
    text = err.value.message
    assert "model needs 3.2 GB" in text
    assert "largest device (b) has 1.5 GB" in text
    assert "fleet's total is 2.5 GB" in text


def test_single_layer_too_big_is_named() -> None:
    layers = (
        LayerInfo("embed", 1.0, param_bytes=100 * MB, activation_bytes=1000),
        LayerInfo("huge", 1.0, param_bytes=900 * MB, activation_bytes=1000),
    )
    table = LayerTable("m", layers, input_bytes=100)
    devices = [device("a", 10, memory_mb=500), device("b", 10, memory_mb=800)]
    with pytest.raises(FailedPrecondition, match=r"layer 1 \(huge\) alone needs"):
        dp.best_plan(devices, table, Network(), Workload(), QoESpec())


def test_impossible_latency_says_by_how_much() -> None:
    devices = [device("a", 10), device("b", 5)]
    table = uniform_table(4, gflops=5.0)  # 20 GFLOP: at least 2 s on the fastest device
    with pytest.raises(FailedPrecondition) as err:
        dp.best_plan(devices, table, Network(), Workload(), QoESpec("min_energy", latency_ms=800))
    text = err.value.message
    assert text.startswith("latency_ms 800 cannot be met: best plan reaches 2000.0 ms")
    assert "(on devices a)" in text


def test_impossible_throughput_and_energy_are_explained() -> None:
    devices = [device("a", 10), device("b", 10)]
    table = uniform_table(4, gflops=5.0)
    with pytest.raises(
        FailedPrecondition, match="min_throughput_sps 100 cannot be met: best plan reaches"
    ):
        dp.best_plan(
            devices, table, Network(), Workload(), QoESpec("min_latency", min_throughput_sps=100)
        )
    with pytest.raises(
        FailedPrecondition, match=r"energy_j_per_sample 0\.001 cannot be met: best plan needs"
    ):
        dp.best_plan(
            devices, table, Network(), Workload(), QoESpec("min_latency", energy_j_per_sample=0.001)
        )


def test_jointly_impossible_bounds_are_explained() -> None:
    """Each bound alone is reachable, both together are not."""
    fast = device("fast", 100, idle=20, active=200)
    frugal = device("frugal", 10, idle=0.5, active=1)
    table = uniform_table(2, gflops=1.0)
    # fast: 20 ms and ~4 J per sample; frugal: 200 ms and ~0.2 J per sample
    qoe = QoESpec("min_latency", latency_ms=50, energy_j_per_sample=1.0)
    with pytest.raises(FailedPrecondition, match="cannot all be met by one plan"):
        dp.best_plan([fast, frugal], table, Network(bandwidth_mbps=1), Workload(), qoe)


def test_bounds_are_met_when_they_bind() -> None:
    fast = device("fast", 100, idle=20, active=200)
    frugal = device("frugal", 10, idle=0.5, active=1)
    table = uniform_table(2, gflops=1.0)
    free = dp.best_plan(
        [fast, frugal], table, Network(bandwidth_mbps=1), Workload(), QoESpec("min_energy")
    )
    assert free.device_ids == ("frugal",)
    bounded = dp.best_plan(
        [fast, frugal],
        table,
        Network(bandwidth_mbps=1),
        Workload(),
        QoESpec("min_energy", latency_ms=100),
    )
    assert bounded.device_ids == ("fast",)
    assert bounded.predicted.latency_ms <= 100


# ---------------------------------------------------------------------------------------------
# Shape of the optimum


def test_max_throughput_splits_in_proportion_to_speed() -> None:
    devices = [device("slow", 10), device("mid", 20), device("fast", 40)]
    table = uniform_table(28, gflops=1.0, act_mb=0.001)
    network = Network("shared", bandwidth_mbps=10_000, latency_ms=0.0)
    plan = dp.best_plan(devices, table, network, Workload(), QoESpec("max_throughput"))
    counts = {s.devices[0].id: s.last - s.first + 1 for s in plan.stages}
    assert set(counts) == {"slow", "mid", "fast"}
    for name, share in (("slow", 1 / 7), ("mid", 2 / 7), ("fast", 4 / 7)):
        assert abs(counts[name] - 28 * share) <= 1.5, counts
    assert counts["slow"] < counts["mid"] < counts["fast"]


def test_min_latency_prefers_one_fast_device_over_a_slow_network() -> None:
    devices = [device("a", 10), device("b", 10)]
    table = uniform_table(6, act_mb=10)
    plan = dp.best_plan(
        devices, table, Network(bandwidth_mbps=10), Workload(), QoESpec("min_latency")
    )
    assert len(plan.stages) == 1


def test_missing_links_are_never_used() -> None:
    devices = [
        device("a", 10, memory_mb=35),
        device("b", 10, memory_mb=35),
        device("c", 10, memory_mb=35),
    ]
    table = uniform_table(6, param_mb=10)  # needs two devices
    network = Network("links", links=(Link(NodeId("a"), NodeId("c"), 100.0, 1.0),))
    plan = dp.best_plan(devices, table, network, Workload(), QoESpec("max_throughput"))
    assert set(plan.device_ids) == {"a", "c"}


def test_training_counts_backward_and_sends_gradients_back() -> None:
    devices = [device("a", 10, memory_mb=100), device("b", 10, memory_mb=100)]
    table = uniform_table(4, param_mb=10)
    inference = dp.best_plan(
        devices, table, Network(), Workload("inference"), QoESpec("max_throughput")
    )
    training = dp.best_plan(
        devices, table, Network(), Workload("training"), QoESpec("max_throughput")
    )
    assert training.predicted.latency_ms > 2.9 * inference.predicted.latency_ms
    flows = {(f.src, f.dst) for f in training.flows}
    assert flows == {("a", "b"), ("b", "a")}


def test_plan_set_uses_disjoint_devices_and_mixes() -> None:
    devices = [device(f"d{k}", 10 + k, memory_mb=1000) for k in range(6)]
    # A 100 Mbit/s medium makes every extra stage cost 80 ms of air time per microbatch, so the
    # best pipeline uses about three devices and leaves the rest for a second plan.
    table = uniform_table(6, act_mb=1.0)
    network = Network(bandwidth_mbps=100)
    plans = dp.plan_set(devices, table, network, Workload(), QoESpec("max_throughput"), max_plans=3)
    assert 2 <= len(plans.plans) <= 3
    used = [set(p.device_ids) for p in plans.plans]
    for i, a in enumerate(used):
        for b in used[i + 1 :]:
            assert not a & b
    assert sum(plans.mix.values()) == pytest.approx(1.0)
    total = sum(p.predicted.throughput_sps for p in plans.plans)
    for p in plans.plans:
        assert plans.mix[p.plan_id] == pytest.approx(p.predicted.throughput_sps / total)
    latency = dp.plan_set(devices, table, network, Workload(), QoESpec("min_latency"), max_plans=3)
    assert len(latency.plans) == 3
    assert [p.device_ids for p in latency.plans] == [("d5",), ("d4",), ("d3",)]
    first = latency.plans[0].plan_id
    assert latency.mix[first] == 1.0
    assert all(v == 0.0 for k, v in latency.mix.items() if k != first)


def test_plan_ids_are_stable() -> None:
    devices = [device("a", 10), device("b", 20)]
    table = uniform_table(4)
    one = dp.best_plan(devices, table, Network(), Workload(), QoESpec())
    two = dp.best_plan(devices, table, Network(), Workload(), QoESpec())
    assert one.plan_id == two.plan_id and one.plan_id.startswith("plan-")


def test_large_fleet_uses_the_twelve_fastest_devices_quickly() -> None:
    rng = random.Random(7)
    devices = [
        device(
            f"d{k:02}",
            rng.uniform(5, 200),
            memory_mb=rng.uniform(1000, 4000),
            idle=rng.uniform(1, 10),
            active=rng.uniform(10, 40),
        )
        for k in range(16)
    ]
    table = uniform_table(96, gflops=0.4, param_mb=120, act_mb=1.0)
    start = time.perf_counter()
    plan = dp.best_plan(
        devices, table, Network(bandwidth_mbps=200, latency_ms=3), Workload(), QoESpec()
    )
    elapsed = time.perf_counter() - start
    fastest = {d.node_id for d in sorted(devices, key=lambda d: -d.gflops)[:12]}
    assert set(plan.device_ids) <= fastest
    assert elapsed < 5.0  # about 0.2 s on a laptop core; generous for CI


# ---------------------------------------------------------------------------------------------
# The cost model by hand


def test_cost_model_by_hand() -> None:
    a = device("a", 10, idle=2, active=6, tx=1)
    b = device("b", 20, idle=1, active=5, tx=3)
    layers = (
        LayerInfo("x", gflops=1.0, param_bytes=10, activation_bytes=1_000_000),
        LayerInfo("y", gflops=2.0, param_bytes=10, activation_bytes=500),
    )
    table = LayerTable("m", layers, input_bytes=100)
    stages = (
        StagePlan(0, 0, (DeviceShare(NodeId("a")),)),
        StagePlan(1, 1, (DeviceShare(NodeId("b")),)),
    )
    network = Network("shared", bandwidth_mbps=80, latency_ms=5)
    pc = cost.evaluate(stages, [a, b], table, network, Workload(batch=2))
    # compute: a 1 GFLOP x 2 / 10 = 0.2 s; b 2 x 2 / 20 = 0.2 s; wire: 2 MB x 8 / 80 Mbit/s = 0.2 s
    assert pc.compute_s == pytest.approx((0.2, 0.2))
    assert pc.transfer_s == pytest.approx((0.205,))
    assert pc.latency_s == pytest.approx(0.605)
    assert pc.bottleneck_s == pytest.approx(0.2)
    assert pc.throughput_sps == pytest.approx(10.0)
    # period 0.2 s: a idles 0 s, computes 0.2 s at 6 W, sends 0.2 s at +1 W; b computes 0.2 s at 5 W
    assert pc.energy_j == pytest.approx(0.2 * 6 + 0.2 * 1 + 0.2 * 5)
    # at 1 request/s the period is 1 s: both devices idle the rest of it
    slow = cost.evaluate(stages, [a, b], table, network, Workload(batch=2, rate_rps=1.0))
    assert slow.energy_j == pytest.approx(pc.energy_j + 0.8 * 2 + 0.8 * 1)
    assert slow.energy_j_per_sample == pytest.approx(slow.energy_j / 2)


def test_shared_medium_sums_transfers_links_do_not() -> None:
    devices = [device("a", 1000), device("b", 1000), device("c", 1000)]
    table = uniform_table(3, gflops=0.001, act_mb=1.0)
    stages = tuple(StagePlan(k, k, (DeviceShare(NodeId(n)),)) for k, n in enumerate("abc"))
    shared = cost.evaluate(stages, devices, table, Network("shared", bandwidth_mbps=8), Workload())
    links = Network(
        "links", links=(Link(NodeId("a"), NodeId("b"), 8.0), Link(NodeId("b"), NodeId("c"), 8.0))
    )
    per_pair = cost.evaluate(stages, devices, table, links, Workload())
    assert shared.network_s == pytest.approx(2.0)  # two 1 MB transfers on one 8 Mbit/s medium
    assert per_pair.network_s == pytest.approx(1.0)
    assert shared.bottleneck_s == pytest.approx(2.0)


def test_stage_memory() -> None:
    layers = (
        LayerInfo("x", 0.0, param_bytes=100, activation_bytes=10, workspace_bytes=5),
        LayerInfo("y", 0.0, param_bytes=200, activation_bytes=20, workspace_bytes=1),
    )
    table = LayerTable("m", layers, input_bytes=7)
    # inference: params + max(in + out + workspace) x samples x 2 in flight
    assert (
        cost.stage_memory_bytes(table, 0, 1, samples=3)
        == 300 + max(7 + 10 + 5, 10 + 20 + 1) * 3 * 2
    )
    # training: 4 x params + (inputs kept + output + workspace) x samples x 2
    assert (
        cost.stage_memory_bytes(table, 0, 1, samples=1, kind="training")
        == 1200 + (7 + 10 + 20 + 5) * 2
    )


# ---------------------------------------------------------------------------------------------
# api.plan validation


def test_api_validates_inputs() -> None:
    good = [device("a", 10)]
    table = uniform_table(2)
    with pytest.raises(InvalidArgument, match="unknown planner 'magic'"):
        api.plan(good, table, Network(), Workload(), QoESpec(), planner="magic")
    with pytest.raises(InvalidArgument, match="layer table is empty"):
        api.plan(good, LayerTable("m", (), 0), Network(), Workload(), QoESpec())
    with pytest.raises(FailedPrecondition, match="no devices"):
        api.plan([], table, Network(), Workload(), QoESpec())
    with pytest.raises(InvalidArgument, match="device a: gflops must be positive"):
        api.plan([device("a", 0)], table, Network(), Workload(), QoESpec())
    with pytest.raises(InvalidArgument, match="device a: memory_bytes must be positive"):
        api.plan([device("a", 10, memory_mb=0)], table, Network(), Workload(), QoESpec())
    with pytest.raises(InvalidArgument, match=r"workload\.batch"):
        api.plan(good, table, Network(), Workload(batch=0), QoESpec())
    with pytest.raises(InvalidArgument, match=r"qoe\.latency_ms"):
        api.plan(good, table, Network(), Workload(), QoESpec(latency_ms=-1))
    with pytest.raises(InvalidArgument, match=r"network\.bandwidth_mbps"):
        api.plan(good, table, Network(bandwidth_mbps=0), Workload(), QoESpec())
    with pytest.raises(InvalidArgument, match="unknown device 'zz'"):
        api.plan(
            good,
            table,
            Network("links", links=(Link(NodeId("a"), NodeId("zz"), 1.0),)),
            Workload(),
            QoESpec(),
        )
    with pytest.raises(InvalidArgument, match=r"model.layers\[1\] \(l1\).gflops"):
        bad = LayerTable("m", (table.layers[0], LayerInfo("l1", -1.0, 0, 0)), 0)
        api.plan(good, bad, Network(), Workload(), QoESpec())


def test_api_returns_a_plan_set() -> None:
    devices = [device("a", 10, memory_mb=100), device("b", 20, memory_mb=100), device("c", 5)]
    result = api.plan(
        devices, uniform_table(8), Network(), Workload(), QoESpec("min_energy"), max_plans=2
    )
    assert 1 <= len(result.plans) <= 2
    assert set(result.mix) == {p.plan_id for p in result.plans}
    assert not math.isnan(result.plans[0].predicted.energy_j_per_sample)


def test_gpipe_step_by_hand() -> None:
    # Two stages, a batch of 2 in microbatches of 1; forward 1 s and backward 2 s per
    # microbatch on each device, no bytes to move. a: F F . . . B B; b: . F F B B: 9 s, not the
    # 12 s of one microbatch of 2 (2 + 2 forward, 4 + 4 backward).
    a, b = device("a", 1.0, idle=1, active=5), device("b", 1.0, idle=1, active=5)
    table = LayerTable("m", (LayerInfo("x", 1.0, 0, 0), LayerInfo("y", 1.0, 0, 0)), 0)
    stages = (StagePlan(0, 0, (DeviceShare(NodeId("a")),)), StagePlan(1, 1, (DeviceShare("b"),)))
    network = Network("shared", bandwidth_mbps=100, latency_ms=0)
    workload = Workload("training", batch=2)
    whole = cost.evaluate(stages, [a, b], table, network, workload)
    cut = cost.evaluate(stages, [a, b], table, network, workload, microbatch=1)
    assert whole.latency_s == pytest.approx(12.0) and whole.microbatches == 1
    assert cut.latency_s == pytest.approx(9.0) and cut.microbatches == 2
    assert cut.bottleneck_s == cut.period_s == pytest.approx(9.0)
    # The same work (6 s a device at 5 W); idle 1 W over the rest of a shorter step.
    assert cut.energy_j == pytest.approx(2 * (6 * 5 + 3 * 1))
    assert whole.energy_j == pytest.approx(2 * (6 * 5 + 6 * 1))
    assert cost.microbatch_options(stages, workload) == (2, 1)
    with pytest.raises(ValueError, match="divide"):
        cost.evaluate(stages, [a, b], table, network, Workload("training", batch=3), microbatch=2)
    with pytest.raises(ValueError, match="inference"):
        cost.evaluate(stages, [a, b], table, network, Workload("inference", 2), microbatch=1)


def test_microbatch_options_keep_whole_samples_on_replicas() -> None:
    stages = (
        StagePlan(0, 0, (DeviceShare(NodeId("a"), 0.75), DeviceShare(NodeId("b"), 0.25))),
        StagePlan(1, 1, (DeviceShare(NodeId("c")),)),
    )
    # 6 of 8 samples and 2 of 8: microbatches of 8 or 4 keep them whole (6/2, 3/1), not 2 or 1.
    assert cost.microbatch_options(stages, Workload("training", batch=8)) == (8, 4)
    assert cost.microbatch_options(stages, Workload("inference", batch=8)) == (8,)


def test_min_energy_training_pipelines_frugal_devices_in_microbatches() -> None:
    """Two frugal devices pipelined meet the step bound only with the step cut into
    microbatches (each alone is too slow, and so is their pipeline of one microbatch); the
    fast, hungry device meets it alone. The planner finds the frugal pipeline and its
    microbatch, cheaper than every plan of one microbatch a step (brute force)."""
    from doramesh.planner import milp

    frugal = [device(n, 10.0, idle=1.0, active=5.0, tx=0.1) for n in ("f1", "f2")]
    hungry = device("h", 25.0, idle=6.0, active=40.0, tx=0.1)
    devices = [*frugal, hungry]
    # Big parameters: a data-parallel pair's gradient all-reduce costs more than it saves.
    table = uniform_table(6, gflops=1.0, param_mb=200, act_mb=0.01)
    network = Network("shared", bandwidth_mbps=1000, latency_ms=0.1)
    workload = Workload("training", batch=8)
    qoe = QoESpec("min_energy", latency_ms=10_000)  # one frugal device alone: 14.4 s
    whole_best = milp.brute_force(devices, table, network, workload, qoe)
    assert whole_best is not None
    got = api.plan(devices, table, network, workload, qoe, time_limit_s=5).plans[0]
    assert got.microbatch < workload.batch
    assert set(got.device_ids) == {"f1", "f2"}
    assert got.predicted.latency_ms <= 10_000
    assert got.predicted.energy_j_per_sample < 0.8 * whole_best.predicted.energy_j_per_sample
    assert got.predicted == cost.predict(
        got.stages, devices, table, network, workload, microbatch=got.microbatch
    )


def test_gpipe_cost_model_agrees_with_the_simulator() -> None:
    """The simulator (independent code) runs the same GPipe schedule: step time and energy
    agree for pipelines, data-parallel groups, shared media and links, at every microbatch.
    (A group's transfers on per-pair links are an upper bound in the cost model, see
    ``milp.py``: there the model may only be pessimistic, by a little.)"""
    from doramesh.scenario_types import Scenario
    from doramesh.simulator import simulate
    from doramesh.types import PlanId, Prediction

    rng = random.Random("gpipe")
    checked = 0
    for _ in range(12):
        devices = [
            device(f"d{k}", rng.uniform(5, 50), idle=rng.uniform(0.5, 5), tx=rng.uniform(0, 1))
            for k in range(3)
        ]
        table = LayerTable(
            "r",
            tuple(
                LayerInfo(
                    f"l{i}",
                    rng.uniform(0.1, 2),
                    int(rng.uniform(1e5, 5e6)),
                    int(rng.uniform(1e4, 1e6)),
                )
                for i in range(4)
            ),
            1000,
        )
        if rng.random() < 0.5:
            network = Network("shared", bandwidth_mbps=rng.uniform(50, 500), latency_ms=1)
        else:
            network = Network(
                "links",
                links=tuple(
                    Link(NodeId(f"d{a}"), NodeId(f"d{b}"), rng.uniform(50, 500), 0.5)
                    for a in range(3)
                    for b in range(a + 1, 3)
                ),
            )
        workload = Workload("training", batch=4)
        group = rng.random() < 0.3
        first = (
            (DeviceShare(NodeId("d0"), 0.5), DeviceShare(NodeId("d1"), 0.5))
            if group
            else (DeviceShare(NodeId("d0")),)
        )
        stages = (
            StagePlan(0, 1, first),
            StagePlan(2, 3, (DeviceShare(NodeId("d2")),)),
        )
        sc = Scenario("t", tuple(devices), network, table, None, workload, QoESpec(), ())
        for size in cost.microbatch_options(stages, workload):
            pc = cost.evaluate(stages, devices, table, network, workload, microbatch=size)
            p = Plan(PlanId("p"), stages, size, (), Prediction(0.0, 0.0, 0.0))
            sim = simulate(p, sc, requests=3, apply_dynamics=False)
            if group and network.kind == "links":
                assert pc.latency_s * 0.95 <= sim.latency_ms / 1e3 <= pc.latency_s * (1 + 1e-6)
                continue
            assert sim.latency_ms == pytest.approx(pc.latency_s * 1e3, rel=1e-6)
            assert sim.energy_j_per_sample == pytest.approx(pc.energy_j_per_sample, rel=1e-6)
            checked += 1
    assert checked >= 20


def test_min_energy_grows_replicas_of_the_frugal_device() -> None:
    """Each frugal device alone misses the step bound and only the hungry one meets it alone;
    with small parameters (a cheap all-reduce) two frugal replicas meet it at the least energy
    of any one-microbatch plan (brute force). The planner grows them from the frugal device."""
    from doramesh.planner import milp

    frugal = [device(n, 10.0, idle=1.0, active=5.0, tx=0.1) for n in ("f1", "f2")]
    devices = [*frugal, device("h", 25.0, idle=6.0, active=40.0, tx=0.1)]
    table = uniform_table(6, gflops=1.0, param_mb=1, act_mb=0.01)
    network = Network("shared", bandwidth_mbps=1000, latency_ms=0.1)
    workload = Workload("training", batch=8)
    qoe = QoESpec("min_energy", latency_ms=10_000)
    expected = milp.brute_force(devices, table, network, workload, qoe)
    assert expected is not None and len(expected.stages[0].devices) == 2
    got = api.plan(devices, table, network, workload, qoe, time_limit_s=5).plans[0]
    assert got.predicted.energy_j_per_sample <= expected.predicted.energy_j_per_sample * (1 + 1e-9)
    assert got.predicted.latency_ms <= 10_000
