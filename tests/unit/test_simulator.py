"""The discrete-event simulator against figures worked out by hand."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

from doramesh.scenario_types import DynamicsEvent, Scenario
from doramesh.sim import SimResult, simulate, split_samples
from doramesh.simulator import simulate as simulate_by_short_name
from doramesh.types import (
    DeviceProfile,
    DeviceShare,
    Flow,
    LayerInfo,
    LayerTable,
    Link,
    Network,
    NodeId,
    Plan,
    PlanId,
    Prediction,
    QoESpec,
    StagePlan,
    Workload,
)

GIB = 1 << 30
MBPS = 1e6 / 8  # bytes per second in one Mbit/s


def device(
    name: str,
    gflops: float,
    *,
    memory: int = 8 * GIB,
    idle: float = 1.0,
    active: float = 5.0,
    tx: float = 0.0,
) -> DeviceProfile:
    return DeviceProfile(
        NodeId(name),
        "test",
        gflops,
        memory,
        power_idle_w=idle,
        power_active_w=active,
        power_tx_w=tx,
    )


def layers(*gflops: float, activation: int = 0, params: int = 0) -> tuple[LayerInfo, ...]:
    return tuple(LayerInfo(f"l{i}", g, params, activation) for i, g in enumerate(gflops))


def scenario(
    devices: Sequence[DeviceProfile],
    model: Sequence[LayerInfo],
    *,
    network: Network | None = None,
    workload: Workload | None = None,
    latency_ms: float | None = None,
    dynamics: Sequence[DynamicsEvent] = (),
) -> Scenario:
    return Scenario(
        name="test",
        devices=tuple(devices),
        network=network or Network(kind="shared", bandwidth_mbps=1000.0, latency_ms=0.0),
        model=LayerTable("test", tuple(model), input_bytes=0),
        zoo_model=None,
        workload=workload or Workload(),
        qoe=QoESpec(latency_ms=latency_ms),
        dynamics=tuple(dynamics),
    )


def plan(
    *stages: tuple[int, int, Sequence[tuple[str, float]]],
    microbatch: int = 1,
    flows: Sequence[Flow] = (),
    plan_id: str = "p",
) -> Plan:
    return Plan(
        PlanId(plan_id),
        tuple(
            StagePlan(first, last, tuple(DeviceShare(NodeId(d), s) for d, s in members))
            for first, last, members in stages
        ),
        microbatch,
        tuple(flows),
        Prediction(0.0, 0.0, 0.0),
    )


def single(name: str, last: int = 0, plan_id: str = "p", microbatch: int = 1) -> Plan:
    return plan((0, last, [(name, 1.0)]), microbatch=microbatch, plan_id=plan_id)


# --- compute ------------------------------------------------------------------------------------


def test_single_device_open_loop_matches_hand_figures() -> None:
    # 2 GFLOP per sample, batch 4 -> 8 GFLOP on a 16 GFLOP/s device: 0.5 s per request.
    sc = scenario(
        [device("a", 16.0)],
        layers(1.5, 0.5),
        workload=Workload(batch=4, rate_rps=1.0),
        latency_ms=600,
    )
    r = simulate(single("a", last=1, microbatch=4), sc, requests=10, arrivals="periodic")
    assert r.feasible and r.completed == 10 and r.lost == 0
    assert r.latency_ms == pytest.approx(500.0, rel=1e-12)
    assert r.latency_ms_p95 == pytest.approx(500.0, rel=1e-12)
    assert r.throughput_sps == pytest.approx(4.0, rel=1e-12)  # one request of 4 a second
    assert r.busy_s == {"a": pytest.approx(5.0, rel=1e-12)}
    assert r.wall_s == pytest.approx(9.5, rel=1e-12)
    assert r.qoe_violation_rate == 0.0


def test_single_device_saturated_matches_hand_figures() -> None:
    # Microbatches of 2 out of a batch of 4: two 0.25 s tasks per request, back to back.
    sc = scenario([device("a", 16.0)], layers(2.0), workload=Workload(batch=4, rate_rps=0.0))
    r = simulate(single("a", microbatch=2), sc, requests=50)
    assert r.throughput_sps == pytest.approx(8.0, rel=1e-12)
    # The window (2 microbatches per stage) holds one request: each runs alone.
    assert r.latency_ms == pytest.approx(500.0, rel=1e-12)
    assert r.wall_s == pytest.approx(25.0, rel=1e-12)


def test_two_stage_pipeline_saturates_at_the_bottleneck() -> None:
    sc = scenario(
        [device("a", 10.0), device("b", 5.0)],
        layers(1.0, 1.0, activation=10_000),
        workload=Workload(batch=1),
    )
    p = plan((0, 0, [("a", 1.0)]), (1, 1, [("b", 1.0)]))
    r = simulate(p, sc, requests=300)
    assert r.throughput_sps == pytest.approx(1 / 0.2, rel=0.01)
    assert r.busy_s["b"] == pytest.approx(300 * 0.2, rel=1e-9)


def test_replicas_split_by_share_finish_together() -> None:
    # 4 samples at 0.75/0.25 -> 3 and 1; at 3 and 1 GFLOP/s each takes 1 s.
    sc = scenario(
        [device("fast", 3.0), device("slow", 1.0)],
        layers(1.0),
        workload=Workload(batch=4, rate_rps=0.5),
    )
    p = plan((0, 0, [("fast", 0.75), ("slow", 0.25)]), microbatch=4)
    r = simulate(p, sc, requests=5, arrivals="periodic")
    assert r.busy_s["fast"] == pytest.approx(5.0, rel=1e-12)
    assert r.busy_s["slow"] == pytest.approx(5.0, rel=1e-12)
    assert r.latency_ms == pytest.approx(1000.0, rel=1e-12)


def test_split_samples() -> None:
    assert split_samples(4, [0.75, 0.25]) == (3, 1)
    assert split_samples(10, [0.5, 0.3, 0.2]) == (5, 3, 2)
    assert split_samples(3, [0.98, 0.01, 0.01]) == (1, 1, 1)  # everyone gets a sample
    assert split_samples(1, [0.2, 0.8]) == (0, 1)  # fewer samples than replicas
    assert split_samples(7, [1.0, 0.0]) == (7, 0)
    for n in range(1, 40):
        assert sum(split_samples(n, [0.6, 0.3, 0.1])) == n


def test_devices_are_shared_fifo_servers_across_plans() -> None:
    # Two plans on one device, each request 0.5 s: offered 1 + 1 rps saturates it exactly.
    sc = scenario([device("a", 2.0)], layers(1.0), workload=Workload(rate_rps=2.0))
    plans = [single("a", plan_id="x"), single("a", plan_id="y")]
    r = simulate(plans, sc, requests=20, arrivals="periodic")
    assert r.busy_s["a"] == pytest.approx(10.0, rel=1e-12)
    assert r.latency_ms == pytest.approx(500.0, rel=1e-9)


def test_mix_dispatch_follows_the_shares() -> None:
    sc = scenario(
        [device("a", 1.0), device("b", 1.0)], layers(0.1), workload=Workload(rate_rps=1.0)
    )
    plans = [single("a", plan_id="x"), single("b", plan_id="y")]
    r = simulate(plans, sc, mix={"x": 3, "y": 1}, requests=400, arrivals="periodic")
    assert r.busy_s["a"] == pytest.approx(300 * 0.1, rel=1e-9)
    assert r.busy_s["b"] == pytest.approx(100 * 0.1, rel=1e-9)
    # A plan with no share is not deployed: its device costs nothing and is not reported.
    r = simulate(plans, sc, mix={"x": 1.0, "y": 0.0}, requests=10)
    assert set(r.busy_s) == {"a"}


# --- network ------------------------------------------------------------------------------------


def _fan_in(network: Network) -> SimResult:
    """Two replicas of stage 0 each send one sample's activation (1 MB) to one stage-1 device."""
    sc = scenario(
        [device("a", 10.0), device("b", 10.0), device("c", 10.0)],
        layers(1.0, 1.0, activation=1_000_000),
        network=network,
        workload=Workload(batch=2, rate_rps=0.1),
    )
    p = plan((0, 0, [("a", 0.5), ("b", 0.5)]), (1, 1, [("c", 1.0)]), microbatch=2)
    return simulate(p, sc, requests=3, arrivals="periodic")


def test_concurrent_transfers_on_a_shared_medium_each_take_twice_as_long() -> None:
    wire = 1_000_000 / (100 * MBPS)  # 0.08 s alone on 100 Mbit/s
    compute = 0.1 + 0.2  # 1 sample on a or b, then 2 samples on c
    shared = _fan_in(Network(kind="shared", bandwidth_mbps=100.0, latency_ms=5.0))
    assert shared.latency_ms == pytest.approx((compute + 2 * wire + 0.005) * 1e3, rel=1e-9)
    links = _fan_in(
        Network(
            kind="links",
            links=(
                Link(NodeId("a"), NodeId("c"), 100.0, 5.0),
                Link(NodeId("b"), NodeId("c"), 100.0, 5.0),
            ),
        )
    )
    assert links.latency_ms == pytest.approx((compute + wire + 0.005) * 1e3, rel=1e-9)
    # Airtime is bytes over capacity however the medium was shared.
    assert shared.tx_s["a"] == pytest.approx(3 * wire, rel=1e-9)
    assert links.tx_s["a"] == pytest.approx(3 * wire, rel=1e-9)


def test_a_missing_link_makes_the_plan_infeasible() -> None:
    network = Network(kind="links", links=(Link(NodeId("a"), NodeId("c"), 100.0),))
    r = _fan_in(network)
    assert not r.feasible and "b" in r.reason and "c" in r.reason
    assert r.throughput_sps == 0.0 and r.lost == 3 and r.qoe_violation_rate == 1.0


def _paced(pacing: bool, *, burst_kb: float = 0.0) -> SimResult:
    sc = scenario(
        [device("a", 1e6), device("b", 1e6)],
        layers(0.0, 0.0, activation=1_000_000),
        network=Network(kind="shared", bandwidth_mbps=100.0),
        workload=Workload(rate_rps=0.1),
    )
    flows = [Flow(NodeId("a"), NodeId("b"), rate_mbps=10.0, burst_kb=burst_kb)]
    p = plan((0, 0, [("a", 1.0)]), (1, 1, [("b", 1.0)]), flows=flows)
    return simulate(p, sc, requests=2, arrivals="periodic", pacing=pacing)


def test_pacing_caps_a_flows_rate() -> None:
    capacity, rate = 100 * MBPS, 10 * MBPS
    assert _paced(False).latency_ms == pytest.approx(1_000_000 / capacity * 1e3, rel=1e-9)
    # The bucket starts full: the burst (floored at 64 kB, as in the agent) goes out at the
    # medium's rate while tokens last, the rest at the flow's rate.
    for burst in (0.0, 200.0):
        tokens = max(burst, 64.0) * 1e3
        t_burst = tokens / (capacity - rate)
        expected = t_burst + (1_000_000 - capacity * t_burst) / rate
        assert _paced(True, burst_kb=burst).latency_ms == pytest.approx(expected * 1e3, rel=1e-9)


def test_bandwidth_change_applies_to_transfers_in_flight() -> None:
    # 1 MB on 100 Mbit/s (0.08 s); at 0.04 s the medium drops to 50 Mbit/s: 0.04 + 0.08.
    sc = scenario(
        [device("a", 1e9), device("b", 1e9)],
        layers(0.0, 0.0, activation=1_000_000),
        network=Network(kind="shared", bandwidth_mbps=100.0),
        workload=Workload(rate_rps=0.1),
        dynamics=[DynamicsEvent(at_s=0.04, bandwidth_mbps=50.0)],
    )
    p = plan((0, 0, [("a", 1.0)]), (1, 1, [("b", 1.0)]))
    r = simulate(p, sc, requests=1)
    assert r.latency_ms == pytest.approx(120.0, rel=1e-9)


# --- dynamics -----------------------------------------------------------------------------------


def test_a_device_leaving_loses_exactly_the_work_that_needed_it() -> None:
    # Plans x (device a) and y (device b) alternate, one request a second, 0.5 s each.
    # b leaves at 5.25 s, running request 5, and joins at 10.5: y's requests 5, 7, 9 are lost.
    sc = scenario(
        [device("a", 2.0), device("b", 2.0)],
        layers(1.0),
        workload=Workload(rate_rps=1.0),
        dynamics=[
            DynamicsEvent(at_s=5.25, device=NodeId("b"), leave=True),
            DynamicsEvent(at_s=10.5, device=NodeId("b"), join=True),
        ],
    )
    plans = [single("a", plan_id="x"), single("b", plan_id="y")]
    r = simulate(plans, sc, requests=20, arrivals="periodic")
    assert (r.completed, r.lost) == (17, 3)
    assert r.qoe_violation_rate == pytest.approx(3 / 20)
    assert r.busy_s["a"] == pytest.approx(5.0, rel=1e-12)
    assert r.busy_s["b"] == pytest.approx(2 * 0.5 + 0.25 + 5 * 0.5, rel=1e-12)
    # Without dynamics nothing is lost.
    static = simulate(plans, sc, requests=20, arrivals="periodic", apply_dynamics=False)
    assert (static.completed, static.lost) == (20, 0)


def test_work_that_already_passed_a_leaving_device_completes() -> None:
    # Stage 0 on a (0.5 s), stage 1 on b (0.25 s). a leaves at 0.6 s, when request 0 is on b.
    sc = scenario(
        [device("a", 2.0), device("b", 4.0)],
        layers(1.0, 1.0),
        workload=Workload(rate_rps=1.0),
        dynamics=[DynamicsEvent(at_s=0.6, device=NodeId("a"), leave=True)],
    )
    p = plan((0, 0, [("a", 1.0)]), (1, 1, [("b", 1.0)]))
    r = simulate(p, sc, requests=3, arrivals="periodic")
    assert (r.completed, r.lost) == (1, 2)
    assert r.latency_ms == pytest.approx(750.0, rel=1e-12)


def test_a_closed_loop_outage_costs_requests_in_proportion_to_its_length() -> None:
    # Saturated, 1 s per request; the device is away from 10.5 s to 20.5 s. Lost: the running
    # and the queued request (the window holds two), then one try a second while it is away.
    sc = scenario(
        [device("a", 1.0)],
        layers(1.0),
        dynamics=[
            DynamicsEvent(at_s=10.5, device=NodeId("a"), leave=True),
            DynamicsEvent(at_s=20.5, device=NodeId("a"), join=True),
        ],
    )
    r = simulate(single("a"), sc, requests=40)
    assert r.lost == 2 + 10
    assert r.completed + r.lost == 40


def test_slowdown_lowers_throughput_accordingly() -> None:
    sc = scenario([device("a", 1.0)], layers(1.0))
    fast = simulate(single("a"), sc, requests=50)
    slowed = scenario(
        [device("a", 1.0)],
        layers(1.0),
        dynamics=[DynamicsEvent(at_s=0.0, device=NodeId("a"), slowdown=2.0)],
    )
    slow = simulate(single("a"), slowed, requests=50)
    assert slow.throughput_sps == pytest.approx(fast.throughput_sps / 2, rel=1e-9)


def test_slowdown_takes_effect_on_the_running_task() -> None:
    # Ten 1 s requests back to back; from 5.5 s at half speed: 5.5 + (0.5 + 4) * 2.
    sc = scenario(
        [device("a", 1.0)],
        layers(1.0),
        dynamics=[DynamicsEvent(at_s=5.5, device=NodeId("a"), slowdown=2.0)],
    )
    r = simulate(single("a"), sc, requests=10)
    assert r.wall_s == pytest.approx(14.5, rel=1e-12)
    assert r.busy_s["a"] == pytest.approx(14.5, rel=1e-12)


# --- energy -------------------------------------------------------------------------------------


def test_energy_accounting_by_hand() -> None:
    # a computes 0.5 s, sends 1 MB (0.08 s on 100 Mbit/s), b computes 0.25 s; 4 requests at
    # 1 rps: wall = 3 + 0.5 + 0.08 + 0.25 = 3.83 s.
    sc = scenario(
        [
            device("a", 2.0, idle=1.0, active=4.0, tx=2.0),
            device("b", 4.0, idle=0.5, active=3.0, tx=7.0),
            device("unused", 100.0, idle=50.0, active=90.0),
        ],
        layers(1.0, 1.0, activation=1_000_000),
        network=Network(kind="shared", bandwidth_mbps=100.0),
        workload=Workload(rate_rps=1.0),
    )
    p = plan((0, 0, [("a", 1.0)]), (1, 1, [("b", 1.0)]))
    r = simulate(p, sc, requests=4, arrivals="periodic")
    wall = 3.83
    assert r.wall_s == pytest.approx(wall, rel=1e-9)
    energy_a = 4.0 * 2.0 + 1.0 * (wall - 2.0) + 2.0 * 4 * 0.08
    energy_b = 3.0 * 1.0 + 0.5 * (wall - 1.0)  # b sends nothing
    assert r.tx_s == {"a": pytest.approx(0.32, rel=1e-9), "b": 0.0}
    assert r.energy_j_per_sample == pytest.approx((energy_a + energy_b) / 4, rel=1e-9)


# --- training -----------------------------------------------------------------------------------


def test_training_step_gpipe_by_hand() -> None:
    # Two stages, two microbatches of one sample; forward 1 s, backward 2 s per microbatch on
    # each device; no bytes to move. a: F F . . . B B; b: . F F B B: the step takes 9 s.
    sc = scenario(
        [device("a", 1.0), device("b", 1.0)],
        layers(1.0, 1.0),
        workload=Workload(kind="training", batch=2),
        latency_ms=9000,
    )
    p = plan((0, 0, [("a", 1.0)]), (1, 1, [("b", 1.0)]), microbatch=1)
    r = simulate(p, sc, requests=3)
    assert r.latency_ms == pytest.approx(9000.0, rel=1e-12)
    assert r.throughput_sps == pytest.approx(2 / 9, rel=1e-12)
    assert r.busy_s == {"a": pytest.approx(18.0), "b": pytest.approx(18.0)}
    assert r.qoe_violation_rate == 0.0


def test_training_with_transfers_and_gradient_all_reduce_by_hand() -> None:
    # Stage 0: 1 GFLOP fwd / 3 GFLOP bwd per sample, 10 MB of parameters, on a and b (half the
    # batch of 4 each, 1 GFLOP/s); stage 1 on c (2 GFLOP/s), 1 GFLOP fwd, bwd twice that.
    model = (
        LayerInfo("l0", 1.0, 10_000_000, 500_000, gflops_bwd=3.0),
        LayerInfo("l1", 1.0, 0, 0),
    )
    net = Network(kind="shared", bandwidth_mbps=100.0, latency_ms=1.0)
    sc = scenario(
        [device("a", 1.0), device("b", 1.0), device("c", 2.0)],
        model,
        network=net,
        workload=Workload(kind="training", batch=4),
    )
    p = plan((0, 0, [("a", 0.5), ("b", 0.5)]), (1, 1, [("c", 1.0)]), microbatch=4)
    r = simulate(p, sc, requests=2)
    cap = 100 * MBPS
    fwd0 = 2.0  # 2 samples x 1 GFLOP at 1 GFLOP/s, a and b in parallel
    act = 2 * (2 * 500_000) / cap + 0.001  # a and b each send 2 samples, sharing the medium
    fwd1 = 4 * 1.0 / 2.0
    bwd1 = 4 * 2.0 / 2.0
    grad = act  # the same bytes back, to both replicas at once
    bwd0 = 2 * 3.0
    ring = 2 * 10_000_000 / cap + 2 * 0.001  # each sends 2(n-1)/n x 10 MB, both at once
    step = fwd0 + act + fwd1 + bwd1 + grad + bwd0 + ring
    assert r.latency_ms == pytest.approx(step * 1e3, rel=1e-9)


def test_training_memory_counts_optimiser_state() -> None:
    # 1 GiB of parameters fits for inference on a 2 GiB device, not for training (x4).
    model = (LayerInfo("l0", 1.0, GIB, 0),)
    devices = [device("a", 1.0, memory=2 * GIB)]
    assert simulate(single("a"), scenario(devices, model), requests=2).feasible
    r = simulate(
        single("a"), scenario(devices, model, workload=Workload(kind="training")), requests=2
    )
    assert not r.feasible and "a" in r.reason
    assert (r.completed, r.lost, r.throughput_sps, r.qoe_violation_rate) == (0, 2, 0.0, 1.0)


def test_memory_of_all_live_plans_adds_up_on_a_device() -> None:
    model = (LayerInfo("l0", 1.0, 3 * GIB, 0),)
    devices = [device("a", 1.0, memory=4 * GIB), device("b", 1.0, memory=4 * GIB)]
    sc = scenario(devices, model)
    assert simulate([single("a", plan_id="x"), single("b", plan_id="y")], sc).feasible
    both = simulate([single("a", plan_id="x"), single("a", plan_id="y")], sc)
    assert not both.feasible


# --- the run ------------------------------------------------------------------------------------


def test_same_seed_same_result_and_seeds_differ() -> None:
    sc = scenario(
        [device("a", 10.0), device("b", 10.0)],
        layers(0.5, 0.5, activation=200_000),
        network=Network(kind="shared", bandwidth_mbps=50.0, latency_ms=2.0),
        workload=Workload(rate_rps=8.0),
        latency_ms=150,
    )
    p = plan((0, 0, [("a", 1.0)]), (1, 1, [("b", 1.0)]))
    first = simulate(p, sc, requests=300, seed=7)
    assert simulate(p, sc, requests=300, seed=7) == first
    assert simulate(p, sc, requests=300, seed=8) != first
    assert simulate_by_short_name(p, sc, requests=300, seed=7) == first


def test_duration_bounds_the_arrivals() -> None:
    sc = scenario([device("a", 10.0)], layers(1.0), workload=Workload(rate_rps=2.0))
    r = simulate(single("a"), sc, duration_s=10.0, arrivals="periodic")
    assert r.completed == 20


def test_default_run_outlasts_the_dynamics() -> None:
    sc = scenario(
        [device("a", 100.0)],
        layers(1.0),
        workload=Workload(rate_rps=1.0),
        dynamics=[DynamicsEvent(at_s=300.0, device=NodeId("a"), slowdown=2.0)],
    )
    r = simulate(single("a"), sc, arrivals="periodic")
    assert r.wall_s > 300.0
    assert simulate(single("a"), sc, arrivals="periodic", apply_dynamics=False).completed == 200


def test_malformed_plans_are_rejected() -> None:
    sc = scenario([device("a", 1.0)], layers(1.0, 1.0))
    with pytest.raises(ValueError, match="cover"):
        simulate(single("a", last=0), sc)
    with pytest.raises(ValueError, match="unknown device"):
        simulate(single("zz", last=1), sc)
    with pytest.raises(ValueError, match="mix"):
        simulate(single("a", last=1), sc, mix={"nope": 1.0})


def test_a_large_plan_simulates_quickly() -> None:
    devices = [device(f"d{i}", 10.0 + i) for i in range(16)]
    model = layers(*([0.05] * 100), activation=100_000, params=1 << 20)
    stages = [(i * 6, 99 if i == 15 else i * 6 + 5, [(f"d{i}", 1.0)]) for i in range(16)]
    sc = scenario(devices, model, workload=Workload(rate_rps=5.0), latency_ms=2000)
    start = time.perf_counter()
    r = simulate(plan(*stages), sc, requests=500)
    assert r.completed == 500
    assert time.perf_counter() - start < 1.0


def test_the_simulator_is_independent_of_the_planner() -> None:
    # The simulator grades the planners, so it must not share their cost model (nor need gRPC
    # or torch to run).
    code = (
        "import sys, doramesh.sim, doramesh.simulator; "
        "bad = [m for m in sys.modules if m.startswith(('doramesh.planner', 'grpc', 'torch'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
