"""The coordinator's settings: built once in the CLI from flags and env, then passed down."""

from __future__ import annotations

from dataclasses import dataclass

#: See ``CoordinatorSettings.max_inflight_requests``.
DEFAULT_MAX_INFLIGHT_REQUESTS = 256


@dataclass(frozen=True, slots=True)
class CoordinatorSettings:
    listen: str = "0.0.0.0:7070"
    #: Server-authenticated TLS port for enrolment (join tokens) and app tokens; "" for none.
    #: Only served when the coordinator holds the fleet authority.
    enrol_listen: str = "0.0.0.0:7073"
    #: Host agents should dial to fetch weights. Empty: derived from ``listen``.
    advertise_host: str = ""
    planner: str = "127.0.0.1:7071"
    #: Agents to admit without mDNS (Wi-Fi that blocks multicast, containers): host:port each.
    static_agents: tuple[str, ...] = ()
    browse: bool = True
    mdns_interfaces: tuple[str, ...] | None = None
    fleet_id: str = ""
    #: Health-check period; an agent is dead after ``dead_after_s`` without an answer.
    heartbeat_s: float = 0.5
    dead_after_s: float = 2.0
    max_agents: int = 256
    #: The LAN as the planner sees it until links are probed: one shared medium.
    network_mbps: float = 1000.0
    network_latency_ms: float = 0.5
    #: Stage weight files kept on disk for agents to fetch (LRU by bytes).
    weight_cache_mb: int = 4096
    #: Default deadline for one inference request when the client gives none.
    infer_timeout_s: float = 120.0
    #: Inference requests (Infer calls and InferStream items, all callers together) in flight at
    #: once; one more is refused at once with RESOURCE_EXHAUSTED rather than queued.
    max_inflight_requests: int = DEFAULT_MAX_INFLIGHT_REQUESTS
    #: Where the coordinator persists its jobs (deployments, training checkpoints) to restore
    #: them after a restart; "" keeps nothing (in-process fleets). The CLI uses --state-dir,
    #: the directory that also holds the fleet CA.
    state_dir: str = ""
    #: After a restart, how long to wait for the agents it last knew before re-deploying.
    restore_wait_s: float = 15.0
    #: Token-bucket pacing of the activation flows (the network scheduler's rates and bursts,
    #: over every live plan of every model together). Off: every sender is unpaced and TCP
    #: alone shares the medium. ``SetPacing`` switches it live.
    pacing: bool = True
