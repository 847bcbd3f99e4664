"""Frozen domain values shared by the planner, agent and coordinator.

Pure data: no gRPC, no torch. Servicers convert protobuf messages to these values at the
edge (see ``doramesh.convert``) and domain code never sees a ``*_pb2`` type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NewType

NodeId = NewType("NodeId", str)
PlanId = NewType("PlanId", str)

Objective = Literal["min_latency", "max_throughput", "min_energy"]
WorkloadKind = Literal["inference", "training"]
NetworkKind = Literal["shared", "links"]

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    node_id: NodeId
    device_class: str
    gflops: float
    memory_bytes: int
    cores: int = 1
    power_idle_w: float = 0.0
    power_active_w: float = 0.0
    power_tx_w: float = 0.0
    battery_wh: float = 0.0
    emulated: bool = False
    address: str = ""
    power_source: str = "catalogue"
    fleet_id: str = ""
    protocol_version: str = "1"


@dataclass(frozen=True, slots=True)
class LayerInfo:
    name: str
    gflops: float
    param_bytes: int
    activation_bytes: int
    workspace_bytes: int = 0
    gflops_bwd: float = 0.0

    @property
    def backward_gflops(self) -> float:
        return self.gflops_bwd if self.gflops_bwd > 0 else 2.0 * self.gflops


@dataclass(frozen=True, slots=True)
class LayerTable:
    model: str
    layers: tuple[LayerInfo, ...]
    input_bytes: int

    def __len__(self) -> int:
        return len(self.layers)


@dataclass(frozen=True, slots=True)
class Link:
    a: NodeId
    b: NodeId
    bandwidth_mbps: float
    latency_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Network:
    kind: NetworkKind = "shared"
    bandwidth_mbps: float = 1000.0
    latency_ms: float = 0.0
    links: tuple[Link, ...] = ()

    def link(self, a: NodeId, b: NodeId) -> tuple[float, float]:
        """(bandwidth Mbit/s, latency ms) between two devices."""
        if a == b:
            return float("inf"), 0.0
        if self.kind == "links":
            for link in self.links:
                if {link.a, link.b} == {a, b}:
                    return link.bandwidth_mbps, link.latency_ms
            return 0.0, float("inf")
        return self.bandwidth_mbps, self.latency_ms


@dataclass(frozen=True, slots=True)
class Workload:
    kind: WorkloadKind = "inference"
    batch: int = 1
    rate_rps: float = 0.0


@dataclass(frozen=True, slots=True)
class QoESpec:
    objective: Objective = "min_latency"
    latency_ms: float | None = None
    min_throughput_sps: float | None = None
    energy_j_per_sample: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceShare:
    id: NodeId
    share: float = 1.0


@dataclass(frozen=True, slots=True)
class StagePlan:
    first: int
    last: int
    devices: tuple[DeviceShare, ...]

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)


@dataclass(frozen=True, slots=True)
class Flow:
    src: NodeId
    dst: NodeId
    rate_mbps: float = 0.0
    burst_kb: float = 0.0


@dataclass(frozen=True, slots=True)
class Prediction:
    latency_ms: float
    throughput_sps: float
    energy_j_per_sample: float


@dataclass(frozen=True, slots=True)
class Plan:
    plan_id: PlanId
    stages: tuple[StagePlan, ...]
    microbatch: int
    flows: tuple[Flow, ...]
    predicted: Prediction

    @property
    def device_ids(self) -> tuple[NodeId, ...]:
        return tuple(d.id for s in self.stages for d in s.devices)


@dataclass(frozen=True, slots=True)
class PlanSet:
    plans: tuple[Plan, ...]
    mix: dict[PlanId, float] = field(default_factory=dict)
