"""The agent's settings: built once in the CLI from flags and env, then passed down."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

#: See ``AgentSettings.max_inflight_microbatches``.
DEFAULT_MAX_INFLIGHT_MICROBATCHES = 256


def default_node_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class AgentSettings:
    #: Address the gRPC server binds ("0.0.0.0:7072" on a device, "127.0.0.1:0" in tests).
    listen: str = "0.0.0.0:7072"
    #: Host peers should dial (announced by mDNS). Empty: derived from ``listen``.
    advertise_host: str = ""
    node_id: str = field(default_factory=default_node_id)
    fleet_id: str = ""
    #: Catalogue class to emulate (paces compute, reports its memory and power), or None.
    emulate: str | None = None
    #: Cap on the memory doramesh may use on this device, in MiB (None: measured).
    memory_limit_mb: int | None = None
    #: Interfaces mDNS binds to; None = all. The demo and tests use ["127.0.0.1"].
    mdns_interfaces: tuple[str, ...] | None = None
    announce: bool = True
    #: Where fetched stage weights are cached, by digest.
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "doramesh" / "weights")
    #: Bytes of stage weights kept in ``cache_dir`` (least recently used evicted first).
    weight_cache_mb: int = 4096
    #: Seconds spent measuring this device's speed at start.
    measure_s: float = 0.5
    #: torch intra-op threads for stage compute (0 = torch's default).
    threads: int = 0
    device: str = "cpu"
    #: Microbatches this agent works on at once, over all its Forward streams; one more is
    #: answered RESOURCE_EXHAUSTED at once rather than queued.
    max_inflight_microbatches: int = DEFAULT_MAX_INFLIGHT_MICROBATCHES
    #: Catalogue class whose power modes this (real, not emulated) device has; None: no modes.
    #: An emulating agent has its emulated class's modes, applied by pacing.
    power_modes_class: str | None = None
    #: Command that switches a real device's mode, run as ``ARGV + [MODE NAME]`` (no shell);
    #: empty: cpufreq caps where writable, else no modes.
    power_mode_command: tuple[str, ...] = ()
