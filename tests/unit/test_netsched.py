"""The network scheduler: token buckets per flow, SLO-first allocation, max-min fairness."""

from __future__ import annotations

import math

from doramesh.planner import cost, milp, netsched
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
)

MB = 1_000_000


def device(name: str, gflops: float = 20.0) -> DeviceProfile:
    return DeviceProfile(
        node_id=NodeId(name),
        device_class="test",
        gflops=gflops,
        memory_bytes=10_000 * MB,
        power_idle_w=2.0,
        power_active_w=6.0,
        power_tx_w=1.0,
    )


def table(act_mb: float, layers: int = 2, gflops: float = 1.0) -> LayerTable:
    return LayerTable(
        "t",
        tuple(
            LayerInfo(f"l{i}", gflops=gflops, param_bytes=MB, activation_bytes=int(act_mb * MB))
            for i in range(layers)
        ),
        input_bytes=1000,
    )


def pipeline(
    ids: tuple[str, ...],
    devices: list[DeviceProfile],
    tab: LayerTable,
    network: Network,
    workload: Workload,
) -> Plan:
    per = len(tab.layers) // len(ids)
    stages = tuple(
        StagePlan(k * per, (k + 1) * per - 1, (DeviceShare(NodeId(i), 1.0),))
        for k, i in enumerate(ids)
    )
    return milp.make_plan(stages, devices, tab, network, workload)


def total_rate(plans: tuple[Plan, ...]) -> float:
    return sum(f.rate_mbps for p in plans for f in p.flows)


def test_a_plan_alone_keeps_its_figures_and_sends_whole_activations() -> None:
    devices = [device("a"), device("b")]
    tab = table(act_mb=1.0)
    network = Network("shared", 100, 2)
    workload = Workload("inference", 1, rate_rps=2.0)
    plan = pipeline(("a", "b"), devices, tab, network, workload)
    (paced,) = netsched.schedule([plan], devices, tab, network, workload, QoESpec(latency_ms=500))
    assert paced.predicted == cost.predict(plan.stages, devices, tab, network, workload)
    (flow,) = paced.flows
    assert flow.burst_kb == 1000.0  # one microbatch's activation, sent at the line rate
    assert flow.rate_mbps <= 100 * (1 + 1e-9)
    assert flow.rate_mbps >= 8.0 * 2.0  # the floor: 8 Mbit per microbatch, 2 per second
    assert paced.plan_id == plan.plan_id and paced.stages == plan.stages


def test_small_activations_get_the_minimum_burst() -> None:
    devices = [device("a"), device("b")]
    tab = table(act_mb=0.001)
    network = Network("shared", 100)
    workload = Workload("inference", 1)
    plan = pipeline(("a", "b"), devices, tab, network, workload)
    (paced,) = netsched.schedule([plan], devices, tab, network, workload, QoESpec())
    assert paced.flows[0].burst_kb == netsched.MIN_BURST_BYTES / 1e3


def test_latency_critical_plan_is_protected_and_the_others_slow_down() -> None:
    """Plan A has a latency SLO that needs 80 of the medium's 100 Mbit/s while it sends; plan
    B (not critical) is capped at what is left and sends in chunks."""
    devices = [device(n) for n in ("a1", "a2", "b1", "b2")]
    network = Network("shared", 100, 0)
    workload = Workload("inference", 1, rate_rps=2.0)
    # One model: layers 0-1 send 1 MB activations, layers 2-3 send 4 MB; 1 GFLOP each (50 ms).
    both = LayerTable(
        "ab", (*table(act_mb=1.0).layers, *table(act_mb=4.0).layers), input_bytes=1000
    )

    def two_stages(first: str, second: str, cut: int) -> Plan:
        stages = (
            StagePlan(0, cut, (DeviceShare(NodeId(first), 1.0),)),
            StagePlan(cut + 1, 3, (DeviceShare(NodeId(second), 1.0),)),
        )
        return milp.make_plan(stages, devices, both, network, workload)

    plan_a = two_stages("a1", "a2", 0)  # sends 8 Mbit: 80 ms alone on the medium
    plan_b = two_stages("b1", "b2", 2)  # sends 32 Mbit
    alone_a = cost.evaluate(plan_a.stages, devices, both, network, workload)
    assert math.isclose(alone_a.latency_s, 0.05 + 0.15 + 0.08)
    qoe = QoESpec(latency_ms=300.0)  # 100 ms of wire budget for 8 Mbit: 80 Mbit/s free

    protected = netsched.schedule(
        [plan_a, plan_b], devices, both, network, workload, qoe, latency_critical={plan_a.plan_id}
    )
    assert total_rate(protected) <= 100 * (1 + 1e-9)
    a, b = protected
    assert a.predicted.latency_ms <= 300.0 * (1 + 1e-6)
    # B may take at most 100 - 8 Mbit / 0.1 s = 20 Mbit/s, and sends chunks, not 4 MB bursts.
    assert sum(f.rate_mbps for f in b.flows) <= 20.0 * (1 + 1e-6)
    assert all(f.burst_kb <= netsched.CHUNK_BYTES / 1e3 for f in b.flows)
    assert b.predicted.throughput_sps < plan_b.predicted.throughput_sps  # it slowed down
    assert b.predicted.latency_ms > plan_b.predicted.latency_ms

    # Without the protection, fair sharing would have broken A's SLO.
    fair = netsched.schedule(
        [plan_a, plan_b], devices, both, network, workload, qoe, latency_critical=set()
    )
    assert fair[0].predicted.latency_ms > 300.0
    assert total_rate(fair) <= 100 * (1 + 1e-9)


def test_spare_capacity_is_shared_max_min_fairly() -> None:
    devices = [device(n) for n in ("a1", "a2", "b1", "b2", "c1", "c2")]
    network = Network("shared", 300, 0)
    workload = Workload("inference", 1, rate_rps=1.0)
    tab = table(act_mb=1.0)
    plans = [
        pipeline(ids, devices, tab, network, workload)
        for ids in (("a1", "a2"), ("b1", "b2"), ("c1", "c2"))
    ]
    paced = netsched.schedule(plans, devices, tab, network, workload, QoESpec())
    rates = [sum(f.rate_mbps for f in p.flows) for p in paced]
    assert all(math.isclose(r, 100.0) for r in rates)  # equal parties, equal shares
    # No plan is latency-critical: every flow keeps whole-activation bursts.
    assert all(f.burst_kb == 1000.0 for p in paced for f in p.flows)


def test_an_overloaded_medium_scales_the_floors_down() -> None:
    devices = [device(n, gflops=1000.0) for n in ("a1", "a2", "b1", "b2")]
    network = Network("shared", 100, 0)
    workload = Workload("inference", 1)  # flat out: each plan alone would fill the medium
    tab = table(act_mb=1.0)
    plans = [pipeline(ids, devices, tab, network, workload) for ids in (("a1", "a2"), ("b1", "b2"))]
    paced = netsched.schedule(plans, devices, tab, network, workload, QoESpec())
    assert total_rate(paced) <= 100 * (1 + 1e-9)
    for before, after in zip(plans, paced, strict=True):
        assert math.isclose(after.predicted.throughput_sps, before.predicted.throughput_sps / 2)


def test_links_are_scheduled_per_directed_link() -> None:
    devices = [device(n) for n in ("a", "b", "c")]
    network = Network(
        "links",
        links=(Link(NodeId("a"), NodeId("b"), 50, 1), Link(NodeId("b"), NodeId("c"), 200, 1)),
    )
    workload = Workload("inference", 1, rate_rps=1.0)
    tab = table(act_mb=1.0)
    ab = pipeline(("a", "b"), devices, tab, network, workload)
    bc = pipeline(("b", "c"), devices, tab, network, workload)
    paced = netsched.schedule([ab, bc], devices, tab, network, workload, QoESpec())
    assert paced[0].flows[0].rate_mbps <= 50 * (1 + 1e-9)
    assert paced[1].flows[0].rate_mbps <= 200 * (1 + 1e-9)
    # Different links: neither plan slows the other.
    for before, after in zip((ab, bc), paced, strict=True):
        assert after.predicted == before.predicted


def test_training_paces_the_gradients_too() -> None:
    devices = [device("a"), device("b"), device("c")]
    network = Network("shared", 100, 1)
    workload = Workload("training", 2)
    tab = table(act_mb=0.5, layers=3)
    plan = pipeline(("a", "b", "c"), devices, tab, network, workload)
    assert len(plan.flows) == 4  # two cuts, forward and back
    (paced,) = netsched.schedule([plan], devices, tab, network, workload, QoESpec())
    assert {(f.src, f.dst) for f in paced.flows} == {("a", "b"), ("b", "c"), ("c", "b"), ("b", "a")}
    assert all(f.rate_mbps > 0 and f.burst_kb >= 64 for f in paced.flows)
    assert total_rate((paced,)) <= 100 * (1 + 1e-9)
    assert paced.predicted == cost.predict(plan.stages, devices, tab, network, workload)


def test_data_parallel_groups_split_their_flows() -> None:
    devices = [device("a"), device("b"), device("c")]
    network = Network("shared", 100, 1)
    workload = Workload("inference", 4)
    tab = table(act_mb=1.0)
    stages = (
        StagePlan(0, 0, (DeviceShare(NodeId("a"), 1.0),)),
        StagePlan(1, 1, (DeviceShare(NodeId("b"), 0.5), DeviceShare(NodeId("c"), 0.5))),
    )
    plan = milp.make_plan(stages, devices, tab, network, workload)
    (paced,) = netsched.schedule([plan], devices, tab, network, workload, QoESpec())
    assert [(f.src, f.dst) for f in paced.flows] == [("a", "b"), ("a", "c")]
    assert all(math.isclose(f.burst_kb, 2000.0) for f in paced.flows)  # half of 4 MB each
    assert paced.predicted == plan.predicted


def test_schedule_is_pure() -> None:
    devices = [device("a"), device("b")]
    tab = table(act_mb=1.0)
    network = Network("shared", 100)
    workload = Workload("inference", 1, rate_rps=3.0)
    plan = pipeline(("a", "b"), devices, tab, network, workload)
    first = netsched.schedule([plan], devices, tab, network, workload, QoESpec(latency_ms=300))
    second = netsched.schedule([plan], devices, tab, network, workload, QoESpec(latency_ms=300))
    assert first == second
    assert plan.flows[0].rate_mbps == 0.0  # the input is untouched
    assert netsched.schedule([], devices, tab, network, workload, QoESpec()) == ()


def test_jobs_of_different_models_are_scheduled_together() -> None:
    """A camera model with an SLO and a bulk model without one, each priced with its own layer
    table, workload and QoE: the camera's SLO caps the bulk job, as within one job."""
    devices = [device(n) for n in ("cam", "hub", "nas", "pc")]
    network = Network("shared", 100, 0)
    camera_table = table(act_mb=1.0)  # 8 Mbit per frame; 1 GFLOP a layer: 50 ms
    bulk_table = table(act_mb=4.0)  # 32 Mbit per sample
    camera_load = Workload("inference", 1, rate_rps=2.0)
    bulk_load = Workload("inference", 1, rate_rps=0.0)
    camera = pipeline(("cam", "hub"), devices, camera_table, network, camera_load)
    bulk = pipeline(("nas", "pc"), devices, bulk_table, network, bulk_load)
    slo = QoESpec(latency_ms=200.0)  # 100 ms of compute: 100 ms of wire for 8 Mbit
    jobs = [
        netsched.Job((camera,), camera_table, camera_load, slo),
        netsched.Job((bulk,), bulk_table, bulk_load, QoESpec(objective="max_throughput")),
    ]
    (paced_camera,), (paced_bulk,) = netsched.schedule_jobs(jobs, devices, network)
    assert paced_camera.predicted.latency_ms <= 200.0 * (1 + 1e-6)
    assert paced_bulk.flows[0].rate_mbps <= 100 - 8 / 0.1 + 1e-6  # what the SLO leaves
    assert paced_camera.flows[0].burst_kb == 1000.0  # a whole frame's activation at once
    assert paced_bulk.flows[0].burst_kb <= netsched.CHUNK_BYTES / 1e3
    # One job alone is what ``schedule`` gives.
    (alone,) = netsched.schedule_jobs([jobs[1]], devices, network)
    assert alone == netsched.schedule(
        [bulk], devices, bulk_table, network, bulk_load, QoESpec(objective="max_throughput")
    )
    assert alone[0].flows[0].rate_mbps > paced_bulk.flows[0].rate_mbps


def test_a_critical_plan_keeps_a_margin_of_its_wire_budget_when_there_is_room() -> None:
    devices = [device(n) for n in ("cam", "hub", "nas", "pc")]
    network = Network("shared", 100, 0)
    camera_table, bulk_table = table(act_mb=1.0), table(act_mb=4.0)
    camera_load = Workload("inference", 1, rate_rps=2.0)
    bulk_load = Workload("inference", 1, rate_rps=0.0)
    camera = pipeline(("cam", "hub"), devices, camera_table, network, camera_load)
    bulk = pipeline(("nas", "pc"), devices, bulk_table, network, bulk_load)
    jobs = [
        netsched.Job((camera,), camera_table, camera_load, QoESpec(latency_ms=300.0)),
        netsched.Job((bulk,), bulk_table, bulk_load, QoESpec(objective="max_throughput")),
    ]
    (paced_camera,), (paced_bulk,) = netsched.schedule_jobs(jobs, devices, network)
    # 100 ms of compute; the wire budget is 200 ms less one 64 KB bulk chunk ahead (5.12 ms).
    budget = 0.2 - netsched.CHUNK_BYTES * 8 / 100e6
    need = 8.0 / (budget * (1 - netsched.SLO_MARGIN))
    assert math.isclose(paced_bulk.flows[0].rate_mbps, 100 - need, rel_tol=1e-6)
    # The camera is priced that margin under its SLO.
    assert paced_camera.predicted.latency_ms < 300.0 - 0.2 * budget * 1e3


def test_a_given_inference_plan_is_priced_at_its_own_request_size() -> None:
    """A plan deployed as given may carry another microbatch than the job's default workload
    (a request is one microbatch of the plan's size): the joint schedule prices it at that."""
    devices = [device(n) for n in ("cam", "hub", "nas", "pc")]
    network = Network("shared", 100, 0)
    bulk_table = table(act_mb=4.0)
    given = Workload("inference", 5, rate_rps=0.0)
    bulk = pipeline(("nas", "pc"), devices, bulk_table, network, given)
    assert bulk.microbatch == 5
    default = Workload("inference", 1, rate_rps=0.0)
    camera_table = table(act_mb=1.0)
    camera_load = Workload("inference", 1, rate_rps=2.0)
    camera = pipeline(("cam", "hub"), devices, camera_table, network, camera_load)
    jobs = [
        netsched.Job((camera,), camera_table, camera_load, QoESpec(latency_ms=300.0)),
        netsched.Job((bulk,), bulk_table, default, QoESpec(objective="max_throughput")),
    ]
    (_,), (paced_bulk,) = netsched.schedule_jobs(jobs, devices, network)
    with_size = [netsched.Job((bulk,), bulk_table, given, QoESpec(objective="max_throughput"))]
    (_,), (same,) = netsched.schedule_jobs([jobs[0], *with_size], devices, network)
    assert paced_bulk == same
