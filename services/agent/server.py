"""The agent daemon: profile the device, serve gRPC (Agent + health), announce by mDNS.

Secure unless run ``--insecure``: it serves mutual TLS with the certificate it got at enrolment,
whose node id must be the one it announces (the coordinator admits it only if they match).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import structlog
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from doramesh.agent.catalogue import get_class
from doramesh.agent.config import AgentSettings
from doramesh.agent.pacing import ComputePacer
from doramesh.agent.power import command_switch, cpufreq_switch, no_switch, paced_switch
from doramesh.agent.profiler import build_profile
from doramesh.agent.runtime import StageRuntime, WeightCache
from doramesh.agent.servicer import AgentServicer
from doramesh.channels import UNSET, Unset, acting_as, bind, create_server, resolve_credentials
from doramesh.discovery import Announcer, lan_address
from doramesh.errors import FailedPrecondition
from doramesh.security.credentials import Credentials
from doramesh.streams import add_agent_servicer
from doramesh.tensors import tune_allocator_for_streaming
from doramesh.types import DeviceProfile, PowerMode

_log = structlog.get_logger("agent")

AGENT_SERVICE = "doramesh.v1.Agent"


def _power_modes(s: AgentSettings) -> tuple[PowerMode, ...]:
    """The power modes this device has, top mode first: the emulated class's, or the class an
    operator named for a real device (``--power-modes``); none otherwise."""
    name = s.emulate or s.power_modes_class
    return tuple(get_class(name).power_modes) if name else ()


class AgentServer:
    """One agent: start() binds, profiles and announces; stop() drains and withdraws."""

    def __init__(
        self, settings: AgentSettings, *, credentials: Credentials | Unset | None = UNSET
    ) -> None:
        """``credentials``: this device's enrolled certificate (default: the process's, see
        ``channels``); None runs it insecure (development only)."""
        self.settings = settings
        self._credentials_arg = credentials
        self.credentials: Credentials | None = None
        self.address = ""
        self.profile: DeviceProfile | None = None
        self.runtime: StageRuntime | None = None
        # grpc.aio objects bind to the running event loop: made in start(), not here.
        self._server: Any = None
        self._health: Any = None
        self._announcer: Announcer | None = None

    async def start(self) -> str:
        creds = resolve_credentials(self._credentials_arg)
        identity = creds.identity if creds is not None else None
        if identity is not None and (
            identity.role != "agent" or identity.name != self.settings.node_id
        ):
            raise FailedPrecondition(
                f"this agent's certificate is for {identity}, not node {self.settings.node_id!r}"
            )
        self.credentials = creds
        # Channels opened from here on (and from every call this server handles) present it.
        with acting_as(creds):
            return await self._start()

    async def _start(self) -> str:
        s = self.settings
        if s.threads > 0:
            torch.set_num_threads(s.threads)
        # Activation chunks are ~1 MiB buffers made and freed per message: keep them reusable.
        tune_allocator_for_streaming()
        self._server = create_server("agent", credentials=self.credentials)
        self._health = health.aio.HealthServicer()
        bound = bind(self._server, s.listen)
        host, _, port = bound.rpartition(":")
        if s.advertise_host:
            host = s.advertise_host
        elif host in {"0.0.0.0", "[::]", ""}:
            host = lan_address(s.mdns_interfaces)
        self.address = f"{host}:{port}"
        modes = _power_modes(s)
        profile = await asyncio.to_thread(
            build_profile,
            s.node_id,
            self.address,
            emulate=s.emulate,
            memory_limit_bytes=(s.memory_limit_mb << 20) if s.memory_limit_mb else None,
            fleet_id=s.fleet_id,
            measure_s=s.measure_s,
            threads=s.threads or None,
            device=s.device,
            power_modes=modes,
        )
        self.profile = profile
        pacer = ComputePacer(profile.gflops if s.emulate else None)
        self.runtime = StageRuntime(
            memory_bytes=profile.memory_bytes,
            cache=WeightCache(s.cache_dir, max_bytes=s.weight_cache_mb << 20),
            pacer=pacer,
            device=s.device,
        )
        if s.emulate:
            power = paced_switch(modes, pacer) if modes else no_switch()
        elif s.power_mode_command:
            power = command_switch(s.power_mode_command, modes)
        else:
            power = cpufreq_switch(modes)
        if [m.name for m in power.modes] != [m.name for m in modes]:
            # The switch cannot apply them (cpufreq caps not writable): advertise none.
            profile = replace(profile, power_modes=tuple(power.modes))
            self.profile = profile
        add_agent_servicer(
            AgentServicer(
                profile,
                self.runtime,
                max_inflight_microbatches=s.max_inflight_microbatches,
                power=power,
            ),
            self._server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        await self._server.start()
        for name in ("", AGENT_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if s.announce:
            self._announcer = Announcer(
                node_id=s.node_id,
                host=host,
                port=int(port),
                fleet_id=s.fleet_id,
                interfaces=list(s.mdns_interfaces) if s.mdns_interfaces else None,
            )
            await self._announcer.start()
        _log.info(
            "agent serving",
            node_id=s.node_id,
            address=self.address,
            device_class=profile.device_class,
            gflops=round(profile.gflops, 1),
            memory_mib=profile.memory_bytes >> 20,
        )
        return self.address

    async def stop(self, grace: float = 2.0) -> None:
        """Graceful drain: NOT_SERVING first, then in-flight RPCs get ``grace`` seconds."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        if self._announcer is not None:
            await self._announcer.stop()
        await self._server.stop(grace)
        if self.runtime is not None:
            await self.runtime.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()
