"""The baseline planners: valid plans, each faithful to what it stands for, and the optimal ones
optimal against the rest (on the cost model they share with doramesh)."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from collections.abc import Iterator, Sequence

import pytest

from doramesh.errors import FailedPrecondition
from doramesh.planner import baselines, cost, dp
from doramesh.types import (
    DeviceProfile,
    DeviceShare,
    LayerInfo,
    LayerTable,
    Link,
    Network,
    NodeId,
    Plan,
    QoESpec,
    StagePlan,
    Workload,
    WorkloadKind,
)

MB = 1_000_000
NAMES = (
    "single-device",
    "uniform",
    "memory-proportional",
    "throughput-optimal",
    "latency-optimal",
    "data-parallel",
)
SHARED = Network("shared", bandwidth_mbps=100, latency_ms=1)
INFERENCE = Workload("inference", batch=1)
NO_QOE = QoESpec()


def device(name: str, gflops: float, memory_mb: float = 10_000) -> DeviceProfile:
    return DeviceProfile(
        node_id=NodeId(name),
        device_class="test",
        gflops=gflops,
        memory_bytes=int(memory_mb * MB),
        power_idle_w=2.0,
        power_active_w=6.0,
        power_tx_w=1.0,
    )


def model(gflops: Sequence[float], *, param_mb: float = 10, act_mb: float = 0.1) -> LayerTable:
    layers = tuple(
        LayerInfo(
            f"l{i}", gflops=g, param_bytes=int(param_mb * MB), activation_bytes=int(act_mb * MB)
        )
        for i, g in enumerate(gflops)
    )
    return LayerTable("test", layers, input_bytes=1000)


def random_instance(
    rng: random.Random, *, max_devices: int = 5, max_layers: int = 9
) -> tuple[list[DeviceProfile], LayerTable, Network, Workload]:
    """Heterogeneous speed, memory and links, sized so that memory binds some of the time."""
    n_devices = rng.randint(1, max_devices)
    roomy = rng.random() < 0.3  # then data-parallel groups of the whole model are possible
    devices = [
        DeviceProfile(
            node_id=NodeId(f"d{k}"),
            device_class="random",
            gflops=rng.uniform(1, 50),
            memory_bytes=int(rng.uniform(50e6, 400e6) * (10 if roomy else 1)),
            power_idle_w=rng.uniform(0.5, 5),
            power_active_w=rng.uniform(6, 15),
            power_tx_w=rng.uniform(0.2, 2),
        )
        for k in range(n_devices)
    ]
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
    kind: WorkloadKind = "training" if rng.random() < 0.3 else "inference"
    workload = Workload(kind, batch=rng.choice([1, 2, 3, 4, 8]))
    return devices, table, network, workload


def run(
    name: str,
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network = SHARED,
    workload: Workload = INFERENCE,
) -> Plan:
    plans = baselines.BASELINES[name](devices, table, network, workload, NO_QOE)
    assert len(plans.plans) == 1
    plan = plans.plans[0]
    assert plans.mix == {plan.plan_id: 1.0}
    assert_valid(plan, devices, table, network, workload)
    return plan


def try_run(
    name: str,
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
) -> Plan | None:
    try:
        return run(name, devices, table, network, workload)
    except FailedPrecondition:
        return None


def assert_valid(
    plan: Plan,
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
) -> None:
    """Contiguous stages covering every layer, shares summing to 1, distinct devices, memory
    respected, the cost model's figures, one unpaced flow per pair of consecutive replicas."""
    assert plan.stages[0].first == 0
    assert plan.stages[-1].last == len(table.layers) - 1
    for before, after in itertools.pairwise(plan.stages):
        assert after.first == before.last + 1
    for stage in plan.stages:
        assert stage.first <= stage.last
        assert all(d.share > 0 for d in stage.devices)
        assert sum(d.share for d in stage.devices) == pytest.approx(1.0, abs=1e-12)
        assert cost.fits(stage, devices, table, workload)
    ids = plan.device_ids
    assert len(set(ids)) == len(ids)
    # Only a training step is cut into microbatches (throughput-optimal's), into whole samples.
    assert plan.microbatch == workload.batch or (
        workload.kind == "training"
        and plan.microbatch in cost.microbatch_options(plan.stages, workload)
    )
    assert plan.predicted == cost.predict(
        plan.stages, devices, table, network, workload, microbatch=plan.microbatch
    )
    pairs = sum(len(a.devices) * len(b.devices) for a, b in itertools.pairwise(plan.stages))
    assert len(plan.flows) == pairs * (2 if workload.kind == "training" else 1)
    assert all(f.rate_mbps == 0 and f.burst_kb == 0 for f in plan.flows)


def layer_counts(plan: Plan) -> list[tuple[str, int]]:
    return [(s.devices[0].id, s.last - s.first + 1) for s in plan.stages]


# ---------------------------------------------------------------------------------------------
# Every baseline


def test_the_six_baselines_are_registered_by_their_bench_names() -> None:
    assert tuple(baselines.BASELINES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_valid_plans_or_failed_precondition_on_random_fleets(name: str) -> None:
    rng = random.Random(f"valid-{name}")
    placed = 0
    for _ in range(40):
        devices, table, network, workload = random_instance(rng)
        placed += try_run(name, devices, table, network, workload) is not None
    assert placed >= 10  # the fleets are not all too small


@pytest.mark.parametrize("name", NAMES)
def test_baselines_do_not_read_the_qoe(name: str) -> None:
    """The systems they stand for have no QoE: the same fleet gets the same plan."""
    devices = [device("a", 10), device("b", 20), device("c", 5)]
    table = model([1, 2, 1, 3, 1, 1])
    fn = baselines.BASELINES[name]
    plain = fn(devices, table, SHARED, INFERENCE, QoESpec("min_latency"))
    strict = fn(
        devices,
        table,
        SHARED,
        INFERENCE,
        QoESpec("min_energy", latency_ms=1e-3, min_throughput_sps=1e6, energy_j_per_sample=1e-9),
    )
    assert plain == strict


@pytest.mark.parametrize("name", NAMES)
def test_no_devices_is_a_failed_precondition(name: str) -> None:
    with pytest.raises(FailedPrecondition):
        baselines.BASELINES[name]([], model([1]), SHARED, INFERENCE, NO_QOE)


def test_the_module_is_pure() -> None:
    code = (
        "import sys, doramesh.planner.baselines; "
        "bad = [m for m in ('grpc', 'torch', 'google.protobuf') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# single-device


def test_single_device_picks_the_fastest_device_that_fits() -> None:
    table = model([1] * 4, param_mb=100)  # 400 MB of weights
    devices = [device("small-fast", 100, 300), device("mid", 20, 1000), device("slow", 5, 2000)]
    plan = run("single-device", devices, table)
    assert [s.devices for s in plan.stages] == [(DeviceShare(NodeId("mid"), 1.0),)]


def test_single_device_fails_when_no_device_holds_the_model() -> None:
    table = model([1] * 4, param_mb=100)
    with pytest.raises(FailedPrecondition, match="no device holds the whole model"):
        baselines.single_device(
            [device("a", 10, 300), device("b", 10, 350)], table, SHARED, INFERENCE, NO_QOE
        )


# ---------------------------------------------------------------------------------------------
# uniform


def test_uniform_splits_layers_equally_in_fleet_order() -> None:
    """DeepSpeed's partition_uniform: N // D a stage, the first N % D one more; speed ignored."""
    devices = [device("slow", 1), device("fast", 100), device("mid", 10), device("other", 10)]
    plan = run("uniform", devices, model([1] * 10))
    assert layer_counts(plan) == [("slow", 3), ("fast", 3), ("mid", 2), ("other", 2)]


def test_uniform_with_more_devices_than_layers_leaves_the_last_ones_out() -> None:
    devices = [device(f"d{k}", 10) for k in range(5)]
    plan = run("uniform", devices, model([1] * 3))
    assert layer_counts(plan) == [("d0", 1), ("d1", 1), ("d2", 1)]


def test_uniform_fails_when_a_share_does_not_fit() -> None:
    devices = [device("big", 10, 1000), device("tiny", 10, 50)]
    with pytest.raises(FailedPrecondition, match="tiny"):
        baselines.uniform(devices, model([1] * 4, param_mb=100), SHARED, INFERENCE, NO_QOE)


def test_uniform_fails_between_devices_without_a_link() -> None:
    devices = [device("a", 10), device("b", 10), device("c", 10)]
    network = Network("links", links=(Link(NodeId("a"), NodeId("c"), 100.0),))
    with pytest.raises(FailedPrecondition, match="no link"):
        baselines.uniform(devices, model([1] * 3), network, INFERENCE, NO_QOE)


# ---------------------------------------------------------------------------------------------
# memory-proportional


def test_memory_proportional_follows_memory_largest_first() -> None:
    devices = [device("small", 100, 1000), device("big", 1, 4000), device("mid", 50, 3000)]
    plan = run("memory-proportional", devices, model([1] * 16))
    # shares 4/8, 3/8, 1/8 of 16 layers; compute speed plays no part
    assert layer_counts(plan) == [("big", 8), ("mid", 6), ("small", 2)]


def test_memory_proportional_gives_every_device_a_layer_as_exo_does() -> None:
    devices = [device("huge", 10, 100_000), device("a", 10, 1000), device("b", 10, 1000)]
    plan = run("memory-proportional", devices, model([1] * 5))
    assert layer_counts(plan) == [("huge", 3), ("b", 1), ("a", 1)]
    with pytest.raises(FailedPrecondition, match="at least one"):
        baselines.memory_proportional(devices, model([1] * 2), SHARED, INFERENCE, NO_QOE)


def test_memory_proportional_breaks_memory_ties_by_id_descending() -> None:
    devices = [device("a", 10, 1000), device("b", 10, 1000)]
    plan = run("memory-proportional", devices, model([1] * 4))
    assert layer_counts(plan) == [("b", 2), ("a", 2)]


def test_memory_proportional_fails_when_a_range_does_not_fit() -> None:
    # 4 of 8 heavy layers land on "big", which holds only 3 of them
    devices = [device("big", 10, 320), device("b", 10, 160), device("c", 10, 160)]
    with pytest.raises(FailedPrecondition, match="big"):
        baselines.memory_proportional(
            devices, model([1] * 8, param_mb=100), SHARED, INFERENCE, NO_QOE
        )


def test_proportional_counts() -> None:
    assert baselines.proportional_counts(8, [0.5, 0.25, 0.25]) == [4, 2, 2]
    assert baselines.proportional_counts(24, [1 / 3] * 3) == [8, 8, 8]
    assert baselines.proportional_counts(5, [0.9, 0.05, 0.05]) == [3, 1, 1]


# ---------------------------------------------------------------------------------------------
# data-parallel


def test_data_parallel_splits_the_batch_in_proportion_to_speed() -> None:
    devices = [device("a", 10), device("b", 30), device("c", 20)]
    workload = Workload("inference", batch=6)
    plan = run("data-parallel", devices, model([1, 2, 3]), SHARED, workload)
    (stage,) = plan.stages
    assert stage.devices == (
        DeviceShare(NodeId("b"), 3 / 6),
        DeviceShare(NodeId("c"), 2 / 6),
        DeviceShare(NodeId("a"), 1 / 6),
    )


def test_data_parallel_uses_only_devices_that_hold_the_model() -> None:
    table = model([1] * 4, param_mb=100)
    devices = [device("fast-small", 100, 300), device("a", 10, 1000), device("b", 10, 1000)]
    plan = run("data-parallel", devices, table, SHARED, Workload("inference", batch=4))
    assert {d.id for d in plan.stages[0].devices} == {"a", "b"}
    with pytest.raises(FailedPrecondition, match="no device holds"):
        baselines.data_parallel([device("x", 10, 300)], table, SHARED, INFERENCE, NO_QOE)


def test_data_parallel_splits_whole_samples_only() -> None:
    """A batch of one cannot be split: it runs on the fastest device."""
    devices = [device("a", 10), device("b", 30), device("c", 20)]
    plan = run("data-parallel", devices, model([1, 2]))
    assert plan.stages[0].devices == (DeviceShare(NodeId("b"), 1.0),)


def test_split_by_speed_is_largest_remainder() -> None:
    assert baselines.split_by_speed(6, [30, 20, 10]) == [3, 2, 1]
    assert baselines.split_by_speed(1, [30, 20, 10]) == [1, 0, 0]
    assert baselines.split_by_speed(4, [10, 10, 10]) == [2, 1, 1]
    assert sum(baselines.split_by_speed(7, [3.3, 1.1, 9.9, 2.2])) == 7


# ---------------------------------------------------------------------------------------------
# throughput-optimal


def test_throughput_optimal_replicates_when_that_pays() -> None:
    """Uneven layers, equal devices, a batch that splits: one data-parallel stage beats any
    pipeline (no transfers, perfectly balanced)."""
    devices = [device("a", 10), device("b", 10), device("c", 10)]
    workload = Workload("inference", batch=3)
    plan = run("throughput-optimal", devices, model([1, 2, 3]), SHARED, workload)
    assert len(plan.stages) == 1
    assert {d.id for d in plan.stages[0].devices} == {"a", "b", "c"}


def test_throughput_optimal_pipelines_when_memory_demands_it() -> None:
    table = model([1] * 6, param_mb=100)  # 600 MB; no device holds it
    devices = [device("a", 10, 350), device("b", 20, 350)]
    plan = run("throughput-optimal", devices, table)
    assert len(plan.stages) == 2


@pytest.mark.parametrize("seed", range(5))
def test_throughput_optimal_is_at_least_every_other_baseline(seed: int) -> None:
    rng = random.Random(f"throughput-{seed}")
    compared = 0
    for _ in range(40):
        devices, table, network, workload = random_instance(rng)
        best = try_run("throughput-optimal", devices, table, network, workload)
        for name in NAMES:
            other = try_run(name, devices, table, network, workload)
            if other is None:
                continue
            assert best is not None, f"{name} placed the model, throughput-optimal did not"
            assert best.predicted.throughput_sps >= other.predicted.throughput_sps * (1 - 1e-9), (
                name
            )
            compared += name != "throughput-optimal"
    assert compared >= 30


def hybrid_plans(
    devices: Sequence[DeviceProfile], table: LayerTable, workload: Workload
) -> Iterator[tuple[StagePlan, ...]]:
    """Every plan of the PipeDream / Asteroid search space, by enumeration: stages in the
    speed-sorted order, each on a contiguous group of it (devices between groups unused), the
    batch split by speed over the group's members that hold the stage."""
    order = sorted(devices, key=lambda d: -d.gflops)
    n = len(table.layers)
    for count in range(1, min(n, len(order)) + 1):
        for cuts in itertools.combinations(range(1, n), count - 1):
            edges = (0, *cuts, n)
            for points in itertools.combinations_with_replacement(range(len(order) + 1), 2 * count):
                windows = [(points[2 * k], points[2 * k + 1]) for k in range(count)]
                if any(a >= b for a, b in windows):
                    continue
                stages = []
                for k, (a, b) in enumerate(windows):
                    members = group_members(order[a:b], table, edges[k], edges[k + 1] - 1, workload)
                    if not members:
                        break
                    shares = tuple(DeviceShare(d.node_id, c / workload.batch) for d, c in members)
                    stages.append(StagePlan(edges[k], edges[k + 1] - 1, shares))
                else:
                    yield tuple(stages)


def group_members(
    window: Sequence[DeviceProfile], table: LayerTable, first: int, last: int, workload: Workload
) -> list[tuple[DeviceProfile, int]]:
    pool = list(window)
    while pool:
        counts = baselines.split_by_speed(workload.batch, [d.gflops for d in pool])
        misfits = [
            d
            for d, c in zip(pool, counts, strict=True)
            if c > 0
            and cost.stage_memory_bytes(table, first, last, samples=c, kind=workload.kind)
            > d.memory_bytes
        ]
        if not misfits:
            return [(d, c) for d, c in zip(pool, counts, strict=True) if c > 0]
        pool = [d for d in pool if d not in misfits]
    return []


def test_throughput_optimal_is_exact_on_its_search_space() -> None:
    """Against brute force over every hybrid plan of the speed-sorted order (small fleets), each
    step one microbatch; a training plan cut into microbatches may only be faster."""
    rng = random.Random("hybrid-brute-force")
    checked = 0
    for _ in range(40):
        devices, table, network, workload = random_instance(rng, max_devices=4, max_layers=5)
        best = min(
            (
                cost.evaluate(stages, devices, table, network, workload).bottleneck_s
                for stages in hybrid_plans(devices, table, workload)
            ),
            default=None,
        )
        got = try_run("throughput-optimal", devices, table, network, workload)
        if best is None or best == float("inf"):
            continue
        assert got is not None
        checked += 1
        bottleneck = cost.evaluate(
            got.stages, devices, table, network, workload, microbatch=got.microbatch
        ).bottleneck_s
        assert bottleneck <= best * (1 + 1e-9)
        if workload.kind == "inference":
            assert got.microbatch == workload.batch
    assert checked >= 20


def test_throughput_optimal_without_time_falls_back_to_pipelines() -> None:
    """Out of time, the hybrid search gives way to the pipeline search's answer (or a clear
    FailedPrecondition), never a crash or a half-built plan."""
    devices = [device(f"d{k}", 10 + k) for k in range(6)]
    table = model([1] * 30)
    workload = Workload("inference", batch=4)
    try:
        plans = baselines.throughput_optimal(
            devices, table, SHARED, workload, NO_QOE, time_limit_s=1e-9
        )
    except FailedPrecondition as err:
        assert "time" in err.message
    else:
        assert_valid(plans.plans[0], devices, table, SHARED, workload)


# ---------------------------------------------------------------------------------------------
# latency-optimal


def test_latency_optimal_is_the_exact_min_latency_pipeline() -> None:
    devices = [device("a", 10), device("b", 40), device("c", 5, 300)]
    table = model([1, 3, 1, 2])
    plan = run("latency-optimal", devices, table)
    expected = dp.best_plan(devices, table, SHARED, INFERENCE, QoESpec("min_latency"))
    assert plan.stages == expected.stages


@pytest.mark.parametrize("seed", range(3))
def test_latency_optimal_is_at_most_every_other_baseline(seed: int) -> None:
    """With a batch of one (a single request) no baseline can split it, so the best pipeline
    is the fastest plan of all."""
    rng = random.Random(f"latency-{seed}")
    compared = 0
    for _ in range(30):
        devices, table, network, workload = random_instance(rng)
        workload = Workload(workload.kind, batch=1)
        best = try_run("latency-optimal", devices, table, network, workload)
        for name in NAMES:
            other = try_run(name, devices, table, network, workload)
            if other is None:
                continue
            assert best is not None, f"{name} placed the model, latency-optimal did not"
            assert best.predicted.latency_ms <= other.predicted.latency_ms * (1 + 1e-9), name
            compared += name != "latency-optimal"
    assert compared >= 30
