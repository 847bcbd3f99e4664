"""The fleet registry: admitted agents, their profiles and liveness. Pure state, no I/O."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Literal

from doramesh.errors import ResourceExhausted
from doramesh.types import DeviceProfile, NodeId

AgentState = Literal["alive", "suspect", "dead"]


@dataclass(frozen=True, slots=True)
class AgentRecord:
    profile: DeviceProfile
    state: AgentState
    last_seen: float
    discovered_by: Literal["mdns", "static"]

    @property
    def node_id(self) -> NodeId:
        return self.profile.node_id


@dataclass(slots=True)
class FleetRegistry:
    max_agents: int = 256
    dead_after_s: float = 2.0
    agents: dict[NodeId, AgentRecord] = field(default_factory=dict)
    #: Bumped on every membership or liveness change, so watchers can tell something moved.
    version: int = 0

    def admit(
        self, profile: DeviceProfile, discovered_by: Literal["mdns", "static"], now: float
    ) -> AgentRecord:
        if profile.node_id not in self.agents and len(self.agents) >= self.max_agents:
            # Forget the dead first; refuse only when the fleet is full of live agents.
            dead = [n for n, r in self.agents.items() if r.state == "dead"]
            if not dead:
                raise ResourceExhausted(f"fleet is full ({self.max_agents} agents)")
            del self.agents[dead[0]]
        record = AgentRecord(profile, "alive", now, discovered_by)
        self.agents[profile.node_id] = record
        self.version += 1
        return record

    def heard_from(self, node_id: NodeId, now: float) -> None:
        record = self.agents.get(node_id)
        if record is None:
            return
        if record.state != "alive":
            self.version += 1
        self.agents[node_id] = replace(record, state="alive", last_seen=now)

    def missed(self, node_id: NodeId, now: float) -> AgentState | None:
        """Record a failed health check; returns the new state if it changed."""
        record = self.agents.get(node_id)
        if record is None:
            return None
        state: AgentState = "dead" if now - record.last_seen >= self.dead_after_s else "suspect"
        if state == record.state:
            return None
        self.agents[node_id] = replace(record, state=state)
        self.version += 1
        return state

    def mark_dead(self, node_id: NodeId, now: float) -> None:
        """A failure seen on the data path: dead now, without waiting for health checks."""
        record = self.agents.get(node_id)
        if record is not None and record.state != "dead":
            self.agents[node_id] = replace(record, state="dead", last_seen=now - self.dead_after_s)
            self.version += 1

    def alive(self) -> list[DeviceProfile]:
        return [r.profile for r in self.agents.values() if r.state == "alive"]

    def address(self, node_id: NodeId) -> str:
        return self.agents[node_id].profile.address

    def seconds_since(self, node_id: NodeId, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return now - self.agents[node_id].last_seen
