"""What a scenario is, once loaded: the values every planner, the simulator and the testbed take.

The YAML format is in DESIGN.md ("A scenario file"); ``doramesh.scenario.load_scenario`` turns a
file into a ``Scenario``. Pure data: no I/O, no torch, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

from doramesh.types import DeviceProfile, LayerTable, Network, NodeId, QoESpec, Workload


@dataclass(frozen=True, slots=True)
class DynamicsEvent:
    """One change during a run, ``at_s`` seconds from its start. Exactly one kind is set."""

    at_s: float
    bandwidth_mbps: float | None = None  # the shared medium (or every link) changes rate
    device: NodeId | None = None
    leave: bool = False  # the device goes away (killed, cut off)
    join: bool = False  # the device (back) joins
    slowdown: float | None = None  # the device computes this many times slower


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    devices: tuple[DeviceProfile, ...]
    network: Network
    model: LayerTable
    #: The zoo name when the model came from the zoo (the testbed runs it for real), else None.
    zoo_model: str | None
    workload: Workload
    qoe: QoESpec
    dynamics: tuple[DynamicsEvent, ...] = ()
    description: str = ""
    #: The sample shape the file gave for its zoo model (None: the zoo's default shape).
    zoo_sample_shape: tuple[int, ...] | None = None
