"""Frozen domain values shared by the planner, agent and coordinator.

Pure data: no gRPC, no torch. Servicers convert protobuf messages to these values at the
edge (see ``doramesh.convert``) and domain code never sees a ``*_pb2`` type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, NewType

NodeId = NewType("NodeId", str)
PlanId = NewType("PlanId", str)

Objective = Literal["min_latency", "max_throughput", "min_energy"]
WorkloadKind = Literal["inference", "training"]
NetworkKind = Literal["shared", "links"]

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class PowerMode:
    """A power mode a device can be switched to (nvpmodel mode, package power limit, cpufreq cap).

    ``speed_factor`` scales the profile's ``gflops`` (the top mode's); ``power_active_w`` is the
    device's draw while computing in this mode. Idle and transmit power do not change.
    """

    name: str
    speed_factor: float
    power_active_w: float


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
    #: Modes the device can be switched to, the top one (this profile's own figures) included
    #: when any is listed; empty when it runs at one speed only (or cannot switch: an agent
    #: advertises only the modes it can apply).
    power_modes: tuple[PowerMode, ...] = ()

    def in_mode(self, mode: str) -> DeviceProfile:
        """This device as it runs in ``mode`` ("" = its own figures); ``KeyError`` if unknown."""
        if not mode:
            return self
        for m in self.power_modes:
            if m.name == mode:
                return replace(
                    self, gflops=self.gflops * m.speed_factor, power_active_w=m.power_active_w
                )
        raise KeyError(f"device {self.node_id} has no power mode {mode!r}")


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
    #: The power mode the device runs in for this plan ("" = its top mode, its own figures).
    mode: str = ""


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
