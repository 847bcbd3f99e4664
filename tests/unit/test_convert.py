"""Protobuf <-> domain conversions round-trip, and the plan's JSON has DESIGN.md's shape."""

from __future__ import annotations

import json
import math

import pytest

from doramesh import convert
from doramesh.errors import InvalidArgument
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
    PlanSet,
    Prediction,
    QoESpec,
    StagePlan,
    Workload,
)
from doramesh.v1 import common_pb2

PROFILE = DeviceProfile(
    node_id=NodeId("pi-1"),
    device_class="raspberry-pi-4",
    gflops=8.5,
    memory_bytes=3_000_000_000,
    cores=4,
    power_idle_w=2.7,
    power_active_w=6.4,
    power_tx_w=1.0,
    battery_wh=12.5,
    emulated=True,
    address="10.0.0.2:7072",
    power_source="sysfs",
    fleet_id="home",
    protocol_version="1",
)
TABLE = LayerTable(
    model="gpt2-small",
    layers=(
        LayerInfo("embed", 0.01, 154_000_000, 786_432, workspace_bytes=1024),
        LayerInfo("block0", 0.35, 28_000_000, 786_432, workspace_bytes=4096, gflops_bwd=0.8),
    ),
    input_bytes=8192,
)
PLAN = Plan(
    plan_id=PlanId("plan-abc"),
    stages=(
        StagePlan(0, 0, (DeviceShare(NodeId("pi-1"), 1.0),)),
        StagePlan(1, 1, (DeviceShare(NodeId("phone-1"), 0.25), DeviceShare(NodeId("pi-2"), 0.75))),
    ),
    microbatch=4,
    flows=(
        Flow(NodeId("pi-1"), NodeId("phone-1"), 12.5, 64.0),
        Flow(NodeId("pi-1"), NodeId("pi-2")),
    ),
    predicted=Prediction(latency_ms=123.4, throughput_sps=8.5, energy_j_per_sample=0.75),
)


def test_device_profile_round_trip() -> None:
    assert convert.profile_from_pb(convert.profile_to_pb(PROFILE)) == PROFILE


def test_layer_table_round_trip() -> None:
    pb = convert.layer_table_to_pb(TABLE)
    assert pb.layers[1].gflops_bwd == pytest.approx(0.8)
    assert convert.layer_table_from_pb(pb) == TABLE


@pytest.mark.parametrize(
    "network",
    [
        Network("shared", bandwidth_mbps=100.0, latency_ms=3.0),
        Network(
            "links",
            links=(
                Link(NodeId("a"), NodeId("b"), 50.0, 5.0),
                Link(NodeId("b"), NodeId("c"), 20.0),
            ),
        ),
    ],
)
def test_network_round_trip(network: Network) -> None:
    assert convert.network_from_pb(convert.network_to_pb(network)) == network


def test_network_defaults_and_errors() -> None:
    assert convert.network_from_pb(common_pb2.Network(bandwidth_mbps=10)).kind == "shared"
    with pytest.raises(InvalidArgument, match=r"network\.kind"):
        convert.network_from_pb(common_pb2.Network(kind="mesh"))


@pytest.mark.parametrize("workload", [Workload(), Workload("training", batch=8, rate_rps=2.5)])
def test_workload_round_trip(workload: Workload) -> None:
    assert convert.workload_from_pb(convert.workload_to_pb(workload)) == workload


def test_workload_defaults_and_errors() -> None:
    assert convert.workload_from_pb(common_pb2.Workload()) == Workload("inference", 1, 0.0)
    with pytest.raises(InvalidArgument, match=r"workload\.kind"):
        convert.workload_from_pb(common_pb2.Workload(kind="serving"))


@pytest.mark.parametrize(
    "qoe",
    [
        QoESpec(),
        QoESpec("max_throughput", min_throughput_sps=12.0),
        QoESpec("min_energy", latency_ms=800.0, energy_j_per_sample=0.5),
        QoESpec("min_latency", 100.0, 5.0, 1.0),
    ],
)
def test_qoe_round_trip(qoe: QoESpec) -> None:
    assert convert.qoe_from_pb(convert.qoe_to_pb(qoe)) == qoe


def test_qoe_wire_conventions() -> None:
    pb = convert.qoe_to_pb(QoESpec("min_energy", latency_ms=800.0))
    assert pb.objective == common_pb2.OBJECTIVE_MIN_ENERGY
    assert pb.min_throughput_sps == 0.0 and pb.energy_j_per_sample == 0.0  # None -> 0
    unset = convert.qoe_from_pb(common_pb2.QoESpec())
    assert unset == QoESpec("min_latency", None, None, None)
    with pytest.raises(InvalidArgument, match=r"qoe\.objective"):
        convert.qoe_from_pb(common_pb2.QoESpec(objective=42))  # type: ignore[arg-type]


def test_objective_mapping_is_complete() -> None:
    for objective, number in (
        ("min_latency", common_pb2.OBJECTIVE_MIN_LATENCY),
        ("max_throughput", common_pb2.OBJECTIVE_MAX_THROUGHPUT),
        ("min_energy", common_pb2.OBJECTIVE_MIN_ENERGY),
    ):
        assert convert.objective_to_pb(objective) == number  # type: ignore[arg-type]
        assert convert.objective_from_pb(number) == objective


def test_plan_round_trip() -> None:
    assert convert.plan_from_pb(convert.plan_to_pb(PLAN)) == PLAN


def test_plan_set_round_trip() -> None:
    other = Plan(PlanId("plan-def"), PLAN.stages[:1], 1, (), Prediction(1.0, 2.0, 3.0))
    plan_set = PlanSet(plans=(PLAN, other), mix={PLAN.plan_id: 0.7, other.plan_id: 0.3})
    assert convert.plan_set_from_pb(convert.plan_set_to_pb(plan_set)) == plan_set


def test_bad_stage_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="comes before"):
        convert.stage_from_pb(common_pb2.StagePlan(first=3, last=1))


def test_plan_json_has_the_documented_shape() -> None:
    doc = convert.plan_to_json(PLAN)
    assert doc == {
        "plan_id": "plan-abc",
        "stages": [
            {"layers": [0, 0], "devices": [{"id": "pi-1", "share": 1.0}]},
            {
                "layers": [1, 1],
                "devices": [{"id": "phone-1", "share": 0.25}, {"id": "pi-2", "share": 0.75}],
            },
        ],
        "microbatch": 4,
        "flows": [
            {"src": "pi-1", "dst": "phone-1", "rate_mbps": 12.5, "burst_kb": 64.0},
            {"src": "pi-1", "dst": "pi-2", "rate_mbps": 0.0, "burst_kb": 0.0},
        ],
        "predicted": {"latency_ms": 123.4, "throughput_sps": 8.5, "energy_j_per_sample": 0.75},
    }
    text = json.dumps(doc)
    assert convert.plan_from_json(json.loads(text)) == PLAN


def test_plan_set_json_round_trip_and_infinity() -> None:
    endless = Plan(PlanId("p"), PLAN.stages, 1, (), Prediction(1.0, math.inf, 0.5))
    plan_set = PlanSet(plans=(endless,), mix={PlanId("p"): 1.0})
    doc = convert.plan_set_to_json(plan_set)
    assert doc["mix"] == {"p": 1.0}
    assert doc["plans"][0]["predicted"]["throughput_sps"] is None  # JSON has no infinity
    text = json.dumps(doc, allow_nan=False)
    assert convert.plan_set_from_json(json.loads(text)) == plan_set


def test_malformed_plan_json_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="malformed plan JSON"):
        convert.plan_from_json({"stages": [{"layers": [0]}]})
    with pytest.raises(InvalidArgument, match="malformed plan set JSON"):
        convert.plan_set_from_json({"plans": 3})
