"""Protobuf messages <-> domain values, both ways, and the plan's JSON form.

The edge of every service: servicers and clients call these, domain code never sees a
``*_pb2`` type. Decoding is where wire-level conventions become domain ones: proto3 cannot tell
"unset" from zero, so an unset QoE bound (0) becomes ``None``, an unset workload kind or batch
becomes inference with one sample, and an unset network kind is a shared medium. Values the
domain cannot represent (an unknown objective or kind) raise ``InvalidArgument`` naming the
field; range checks (positive bandwidth, memory...) belong to the consumer, which knows what it
needs (``doramesh.planner.api.validate``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

from doramesh.errors import InvalidArgument
from doramesh.types import (
    DeviceProfile,
    DeviceShare,
    Flow,
    LayerInfo,
    LayerTable,
    Link,
    Network,
    NetworkKind,
    NodeId,
    Objective,
    Plan,
    PlanId,
    PlanSet,
    PowerMode,
    Prediction,
    QoESpec,
    StagePlan,
    Workload,
    WorkloadKind,
)
from doramesh.v1 import common_pb2

_OBJECTIVE_TO_PB: dict[Objective, int] = {
    "min_latency": common_pb2.OBJECTIVE_MIN_LATENCY,
    "max_throughput": common_pb2.OBJECTIVE_MAX_THROUGHPUT,
    "min_energy": common_pb2.OBJECTIVE_MIN_ENERGY,
}
_OBJECTIVE_FROM_PB: dict[int, Objective] = {v: k for k, v in _OBJECTIVE_TO_PB.items()}
_NETWORK_KINDS: tuple[NetworkKind, ...] = ("shared", "links")
_WORKLOAD_KINDS: tuple[WorkloadKind, ...] = ("inference", "training")

# ---------------------------------------------------------------------------------------------
# Fleet, model, workload, QoE


def profile_to_pb(profile: DeviceProfile) -> common_pb2.DeviceProfile:
    return common_pb2.DeviceProfile(
        node_id=profile.node_id,
        device_class=profile.device_class,
        gflops=profile.gflops,
        memory_bytes=profile.memory_bytes,
        cores=profile.cores,
        power_idle_w=profile.power_idle_w,
        power_active_w=profile.power_active_w,
        power_tx_w=profile.power_tx_w,
        battery_wh=profile.battery_wh,
        emulated=profile.emulated,
        address=profile.address,
        power_source=profile.power_source,
        fleet_id=profile.fleet_id,
        protocol_version=profile.protocol_version,
        power_modes=[
            common_pb2.PowerMode(
                name=m.name, speed_factor=m.speed_factor, power_active_w=m.power_active_w
            )
            for m in profile.power_modes
        ],
    )


def profile_from_pb(pb: common_pb2.DeviceProfile) -> DeviceProfile:
    return DeviceProfile(
        node_id=NodeId(pb.node_id),
        device_class=pb.device_class,
        gflops=pb.gflops,
        memory_bytes=pb.memory_bytes,
        cores=pb.cores,
        power_idle_w=pb.power_idle_w,
        power_active_w=pb.power_active_w,
        power_tx_w=pb.power_tx_w,
        battery_wh=pb.battery_wh,
        emulated=pb.emulated,
        address=pb.address,
        power_source=pb.power_source,
        fleet_id=pb.fleet_id,
        protocol_version=pb.protocol_version,
        power_modes=tuple(
            PowerMode(m.name, m.speed_factor, m.power_active_w) for m in pb.power_modes
        ),
    )


def layer_to_pb(layer: LayerInfo) -> common_pb2.LayerInfo:
    return common_pb2.LayerInfo(
        name=layer.name,
        gflops=layer.gflops,
        gflops_bwd=layer.gflops_bwd,
        param_bytes=layer.param_bytes,
        activation_bytes=layer.activation_bytes,
        workspace_bytes=layer.workspace_bytes,
    )


def layer_from_pb(pb: common_pb2.LayerInfo) -> LayerInfo:
    return LayerInfo(
        name=pb.name,
        gflops=pb.gflops,
        param_bytes=pb.param_bytes,
        activation_bytes=pb.activation_bytes,
        workspace_bytes=pb.workspace_bytes,
        gflops_bwd=pb.gflops_bwd,
    )


def layer_table_to_pb(table: LayerTable) -> common_pb2.LayerTable:
    return common_pb2.LayerTable(
        model=table.model,
        layers=[layer_to_pb(layer) for layer in table.layers],
        input_bytes=table.input_bytes,
    )


def layer_table_from_pb(pb: common_pb2.LayerTable) -> LayerTable:
    return LayerTable(
        model=pb.model,
        layers=tuple(layer_from_pb(layer) for layer in pb.layers),
        input_bytes=pb.input_bytes,
    )


def link_to_pb(link: Link) -> common_pb2.Link:
    return common_pb2.Link(
        a=link.a, b=link.b, bandwidth_mbps=link.bandwidth_mbps, latency_ms=link.latency_ms
    )


def link_from_pb(pb: common_pb2.Link) -> Link:
    return Link(
        a=NodeId(pb.a), b=NodeId(pb.b), bandwidth_mbps=pb.bandwidth_mbps, latency_ms=pb.latency_ms
    )


def network_to_pb(network: Network) -> common_pb2.Network:
    return common_pb2.Network(
        kind=network.kind,
        bandwidth_mbps=network.bandwidth_mbps,
        latency_ms=network.latency_ms,
        links=[link_to_pb(link) for link in network.links],
    )


def network_from_pb(pb: common_pb2.Network) -> Network:
    kind = pb.kind or "shared"
    if kind not in _NETWORK_KINDS:
        raise InvalidArgument(f"network.kind must be 'shared' or 'links', got {pb.kind!r}")
    return Network(
        kind=kind,
        bandwidth_mbps=pb.bandwidth_mbps,
        latency_ms=pb.latency_ms,
        links=tuple(link_from_pb(link) for link in pb.links),
    )


def workload_to_pb(workload: Workload) -> common_pb2.Workload:
    return common_pb2.Workload(kind=workload.kind, batch=workload.batch, rate_rps=workload.rate_rps)


def workload_from_pb(pb: common_pb2.Workload) -> Workload:
    kind = pb.kind or "inference"
    if kind not in _WORKLOAD_KINDS:
        raise InvalidArgument(f"workload.kind must be 'inference' or 'training', got {pb.kind!r}")
    return Workload(kind=kind, batch=pb.batch or 1, rate_rps=pb.rate_rps)


def objective_to_pb(objective: Objective) -> int:
    try:
        return _OBJECTIVE_TO_PB[objective]
    except KeyError:
        raise InvalidArgument(f"qoe.objective: unknown objective {objective!r}") from None


def objective_from_pb(value: int) -> Objective:
    """Proto enum to the domain's Literal; UNSPECIFIED means the default, min_latency."""
    if value == common_pb2.OBJECTIVE_UNSPECIFIED:
        return QoESpec().objective
    try:
        return _OBJECTIVE_FROM_PB[value]
    except KeyError:
        raise InvalidArgument(f"qoe.objective: unknown enum value {value}") from None


def qoe_to_pb(qoe: QoESpec) -> common_pb2.QoESpec:
    return common_pb2.QoESpec(
        objective=cast(Any, objective_to_pb(qoe.objective)),
        latency_ms=qoe.latency_ms or 0.0,
        min_throughput_sps=qoe.min_throughput_sps or 0.0,
        energy_j_per_sample=qoe.energy_j_per_sample or 0.0,
    )


def qoe_from_pb(pb: common_pb2.QoESpec) -> QoESpec:
    return QoESpec(
        objective=objective_from_pb(pb.objective),
        latency_ms=pb.latency_ms or None,
        min_throughput_sps=pb.min_throughput_sps or None,
        energy_j_per_sample=pb.energy_j_per_sample or None,
    )


# ---------------------------------------------------------------------------------------------
# Plans


def prediction_to_pb(prediction: Prediction) -> common_pb2.Prediction:
    return common_pb2.Prediction(
        latency_ms=prediction.latency_ms,
        throughput_sps=prediction.throughput_sps,
        energy_j_per_sample=prediction.energy_j_per_sample,
    )


def prediction_from_pb(pb: common_pb2.Prediction) -> Prediction:
    return Prediction(
        latency_ms=pb.latency_ms,
        throughput_sps=pb.throughput_sps,
        energy_j_per_sample=pb.energy_j_per_sample,
    )


def stage_to_pb(stage: StagePlan) -> common_pb2.StagePlan:
    return common_pb2.StagePlan(
        first=stage.first,
        last=stage.last,
        devices=[
            common_pb2.DeviceShare(id=d.id, share=d.share, mode=d.mode) for d in stage.devices
        ],
    )


def stage_from_pb(pb: common_pb2.StagePlan) -> StagePlan:
    if pb.last < pb.first:
        raise InvalidArgument(f"stage: last layer {pb.last} comes before first {pb.first}")
    return StagePlan(
        first=pb.first,
        last=pb.last,
        devices=tuple(DeviceShare(id=NodeId(d.id), share=d.share, mode=d.mode) for d in pb.devices),
    )


def flow_to_pb(flow: Flow) -> common_pb2.Flow:
    return common_pb2.Flow(
        src=flow.src, dst=flow.dst, rate_mbps=flow.rate_mbps, burst_kb=flow.burst_kb
    )


def flow_from_pb(pb: common_pb2.Flow) -> Flow:
    return Flow(
        src=NodeId(pb.src), dst=NodeId(pb.dst), rate_mbps=pb.rate_mbps, burst_kb=pb.burst_kb
    )


def plan_to_pb(plan: Plan) -> common_pb2.Plan:
    return common_pb2.Plan(
        plan_id=plan.plan_id,
        stages=[stage_to_pb(s) for s in plan.stages],
        microbatch=plan.microbatch,
        flows=[flow_to_pb(f) for f in plan.flows],
        predicted=prediction_to_pb(plan.predicted),
    )


def plan_from_pb(pb: common_pb2.Plan) -> Plan:
    return Plan(
        plan_id=PlanId(pb.plan_id),
        stages=tuple(stage_from_pb(s) for s in pb.stages),
        microbatch=pb.microbatch,
        flows=tuple(flow_from_pb(f) for f in pb.flows),
        predicted=prediction_from_pb(pb.predicted),
    )


def plan_set_to_pb(plan_set: PlanSet) -> common_pb2.PlanSet:
    return common_pb2.PlanSet(
        plans=[plan_to_pb(p) for p in plan_set.plans],
        mix={str(k): v for k, v in plan_set.mix.items()},
    )


def plan_set_from_pb(pb: common_pb2.PlanSet) -> PlanSet:
    return PlanSet(
        plans=tuple(plan_from_pb(p) for p in pb.plans),
        mix={PlanId(k): v for k, v in pb.mix.items()},
    )


# ---------------------------------------------------------------------------------------------
# JSON (DESIGN.md, "A plan as JSON")


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The plan in DESIGN.md's JSON shape (plus its ``plan_id``); ``json.dumps``-ready."""
    return {
        "plan_id": plan.plan_id,
        "stages": [
            {
                "layers": [s.first, s.last],
                "devices": [
                    {"id": d.id, "share": d.share, **({"mode": d.mode} if d.mode else {})}
                    for d in s.devices
                ],
            }
            for s in plan.stages
        ],
        "microbatch": plan.microbatch,
        "flows": [
            {"src": f.src, "dst": f.dst, "rate_mbps": f.rate_mbps, "burst_kb": f.burst_kb}
            for f in plan.flows
        ],
        "predicted": {
            "latency_ms": _json_number(plan.predicted.latency_ms),
            "throughput_sps": _json_number(plan.predicted.throughput_sps),
            "energy_j_per_sample": _json_number(plan.predicted.energy_j_per_sample),
        },
    }


def plan_set_to_json(plan_set: PlanSet) -> dict[str, Any]:
    """A plan set: its plans, and ``mix: {plan_id: share}``."""
    return {
        "plans": [plan_to_json(p) for p in plan_set.plans],
        "mix": {str(k): v for k, v in plan_set.mix.items()},
    }


def plan_from_json(data: Mapping[str, Any]) -> Plan:
    """Inverse of ``plan_to_json``; a malformed document raises ``InvalidArgument``."""
    try:
        stages = tuple(
            StagePlan(
                first=int(s["layers"][0]),
                last=int(s["layers"][1]),
                devices=tuple(
                    DeviceShare(
                        id=NodeId(str(d["id"])),
                        share=float(d["share"]),
                        mode=str(d.get("mode", "")),
                    )
                    for d in s["devices"]
                ),
            )
            for s in data["stages"]
        )
        flows = tuple(
            Flow(
                src=NodeId(str(f["src"])),
                dst=NodeId(str(f["dst"])),
                rate_mbps=float(f.get("rate_mbps", 0.0)),
                burst_kb=float(f.get("burst_kb", 0.0)),
            )
            for f in data.get("flows", ())
        )
        predicted = data["predicted"]
        return Plan(
            plan_id=PlanId(str(data.get("plan_id", ""))),
            stages=stages,
            microbatch=int(data["microbatch"]),
            flows=flows,
            predicted=Prediction(
                latency_ms=_number_from_json(predicted["latency_ms"]),
                throughput_sps=_number_from_json(predicted["throughput_sps"]),
                energy_j_per_sample=_number_from_json(predicted["energy_j_per_sample"]),
            ),
        )
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise InvalidArgument(f"malformed plan JSON: {err!r}") from None


def plan_set_from_json(data: Mapping[str, Any]) -> PlanSet:
    try:
        plans = tuple(plan_from_json(p) for p in data["plans"])
        mix = {PlanId(str(k)): float(v) for k, v in data.get("mix", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise InvalidArgument(f"malformed plan set JSON: {err!r}") from None
    return PlanSet(plans=plans, mix=mix)


def _json_number(value: float) -> float | None:
    """JSON has no infinity or NaN: such a figure is written as null."""
    return value if math.isfinite(value) else None


def _number_from_json(value: Any) -> float:
    return math.inf if value is None else float(value)
