"""The coordinator daemon: admits agents (mDNS or a static list), watches their liveness,
deploys plans and serves the client API and stage weights.

Secure (credentials given, the default everywhere but ``--insecure``): the client API, weights
and health are served over mutual TLS; a second, server-authenticated TLS port serves enrolment
(join token) and the client API to apps holding an app token. An agent is admitted only over a
connection pinned to the node id it claims: its certificate must carry that id, so an mDNS
record naming another agent's id at another address never gets through the handshake.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc.aio
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from doramesh import convert
from doramesh.channels import UNSET, Unset, acting_as, bind, create_channel, create_server
from doramesh.channels import resolve_credentials as _resolve_credentials
from doramesh.coordinator.config import CoordinatorSettings
from doramesh.coordinator.deploy import Deployer
from doramesh.coordinator.registry import FleetRegistry
from doramesh.coordinator.servicer import CoordinatorServicer
from doramesh.coordinator.state import CoordinatorPersistence, RestoreReport
from doramesh.coordinator.weights import WeightStore, WeightStoreServicer
from doramesh.discovery import Announcement, Browser, lan_address
from doramesh.errors import DoraMeshError
from doramesh.security.authority import FleetAuthority
from doramesh.security.credentials import Credentials
from doramesh.security.enrolment import EnrolmentServicer
from doramesh.security.identity import server_name
from doramesh.tensors import tune_allocator_for_streaming
from doramesh.types import Network, NodeId
from doramesh.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    coordinator_pb2_grpc,
    security_pb2_grpc,
)

_log = structlog.get_logger("coordinator")

COORDINATOR_SERVICE = "doramesh.v1.Coordinator"


#: Admission channels kept open at once; a flood of bogus announcements cannot exceed it.
MAX_ADMISSION_CHANNELS = 1024


class CoordinatorServer:
    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        credentials: Credentials | Unset | None = UNSET,
        authority: FleetAuthority | None = None,
    ) -> None:
        """``credentials``: the coordinator's certificate (default: the process's, see
        ``channels``); ``authority``: the fleet CA and token secret, to enrol devices and check
        app tokens. With neither, the coordinator runs insecure (development only)."""
        self.settings = settings
        self.address = ""
        #: The server-authenticated TLS port for enrolment and app tokens ("" when insecure).
        self.enrol_address = ""
        self._credentials_arg = credentials
        self.credentials: Credentials | None = None
        self.authority = authority
        self.registry = FleetRegistry(
            max_agents=settings.max_agents, dead_after_s=settings.dead_after_s
        )
        self.weights = WeightStore(settings.weight_cache_mb << 20)
        # grpc.aio objects bind to the running event loop: made in start(), not here.
        self._server: Any = None
        self._health: Any = None
        self._browser: Browser | None = None
        #: (address, node id pinned or "") -> channel; bounded (MAX_ADMISSION_CHANNELS).
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._watchers: dict[NodeId, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._admitting: set[str] = set()
        self.deployer: Deployer | None = None
        self.changed = asyncio.Event()
        #: The persisted jobs (``settings.state_dir``) and, once done, what the restore did.
        self.persistence: CoordinatorPersistence | None = None
        self.restored: asyncio.Future[RestoreReport] | None = None

    async def start(self) -> str:
        self.credentials = _resolve_credentials(self._credentials_arg)
        # Tasks started here (admission, health watchers, deployment) dial as the coordinator.
        with acting_as(self.credentials):
            return await self._start()

    async def _start(self) -> str:
        s = self.settings
        # Activation chunks are ~1 MiB buffers made and freed per message: keep them reusable.
        tune_allocator_for_streaming()
        if s.state_dir:
            self.persistence = CoordinatorPersistence(Path(s.state_dir), s.fleet_id)
        self._server = create_server(
            "coordinator",
            credentials=self.credentials,
            authority=self.authority,
            interceptors=[self.persistence.gate] if self.persistence else (),
        )
        self._health = health.aio.HealthServicer()
        bound = bind(self._server, s.listen)
        enrol_port = ""
        if self.credentials is not None and self.authority is not None and s.enrol_listen:
            security_pb2_grpc.add_EnrolmentServicer_to_server(
                EnrolmentServicer(self.authority), self._server
            )
            enrol_port = bind(self._server, s.enrol_listen, tls_only=True).rpartition(":")[2]
        host, _, port = bound.rpartition(":")
        if s.advertise_host:
            host = s.advertise_host
        elif host in {"0.0.0.0", "[::]", ""}:
            host = lan_address(s.mdns_interfaces)
        self.address = f"{host}:{port}"
        if enrol_port:
            self.enrol_address = f"{host}:{enrol_port}"
        self.deployer = Deployer(
            registry=self.registry,
            weights=self.weights,
            planner_address=s.planner,
            network=Network(
                kind="shared", bandwidth_mbps=s.network_mbps, latency_ms=s.network_latency_ms
            ),
            weights_source=self.address,
            pacing=s.pacing,
        )
        training = None
        if self.persistence is not None:
            self.deployer.on_deployed = self.persistence.deployed
            training = self.persistence.training_jobs(self.deployer)
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(
            CoordinatorServicer(
                self.registry,
                self.deployer,
                infer_timeout_s=s.infer_timeout_s,
                max_inflight_requests=s.max_inflight_requests,
                training=training,
            ),
            self._server,
        )
        coordinator_pb2_grpc.add_WeightStoreServicer_to_server(
            WeightStoreServicer(self.weights), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        await self._server.start()
        for name in ("", COORDINATOR_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for address in s.static_agents:
            self._spawn(self._admit_static(address))
        if s.browse:
            self._browser = Browser(
                self._on_found,
                interfaces=list(s.mdns_interfaces) if s.mdns_interfaces else None,
                fleet_id=s.fleet_id,
                max_entries=s.max_agents * 4,
            )
            await self._browser.start()
        if self.persistence is not None:
            # Served already (agents fetch weights from here); clients wait behind the gate.
            self.restored = asyncio.ensure_future(
                self.persistence.restore(
                    self.deployer,
                    self.registry,
                    wait_s=s.restore_wait_s,
                    timeout_s=max(s.infer_timeout_s, 60.0),
                )
            )
        _log.info(
            "coordinator serving",
            address=self.address,
            enrol_address=self.enrol_address or None,
            planner=s.planner,
            secure=self.credentials is not None,
        )
        return self.address

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _channel(self, address: str, node_id: str = "") -> grpc.aio.Channel:
        """A channel to an agent; with ``node_id``, the handshake fails unless the agent's
        certificate carries that node id (gRPC checks the pinned DNS SAN)."""
        key = (address, node_id)
        channel = self._channels.get(key)
        if channel is None:
            while len(self._channels) >= MAX_ADMISSION_CHANNELS:
                oldest = next(iter(self._channels))
                self._spawn(self._channels.pop(oldest).close())
            channel = self._channels[key] = create_channel(
                address,
                credentials=self.credentials,
                server_name=server_name("agent", node_id) if node_id else None,
            )
        return channel

    def _drop_channel(self, address: str, node_id: str = "") -> None:
        channel = self._channels.pop((address, node_id), None)
        if channel is not None:
            self._spawn(channel.close())

    async def _on_found(self, ann: Announcement) -> None:
        await self._admit(ann.address, expect_node_id=ann.node_id, discovered_by="mdns")

    async def _admit_static(self, address: str) -> None:
        # A static agent may boot after the coordinator: keep trying until it answers.
        delay = 0.2
        while not await self._admit(address, expect_node_id=None, discovered_by="static"):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _admit(self, address: str, *, expect_node_id: str | None, discovered_by: str) -> bool:
        if address in self._admitting:
            return True
        self._admitting.add(address)
        try:
            if expect_node_id is None:
                # A static address: learn who claims to be there, then prove it below.
                pb = await self._get_profile(address, "")
                if pb is None:
                    return False
                expect_node_id = pb.node_id
            # The handshake pins the node id: only a certificate for it gets through.
            pb = await self._get_profile(address, expect_node_id)
            if pb is None:
                return False
            profile = convert.profile_from_pb(pb)
            if expect_node_id is not None and profile.node_id != expect_node_id:
                _log.warning(
                    "announced node id does not match the agent; not admitted",
                    address=address,
                    announced=expect_node_id,
                    answered=profile.node_id,
                )
                return False
            if self.settings.fleet_id and profile.fleet_id != self.settings.fleet_id:
                return False
            if profile.address != address:
                # Trust the address we reached it on, not the one it believes it has.
                from dataclasses import replace

                profile = replace(profile, address=address)
            try:
                known = self.registry.agents.get(profile.node_id)
                self.registry.admit(
                    profile,
                    "mdns" if discovered_by == "mdns" else "static",
                    time.monotonic(),
                )
            except DoraMeshError as err:
                _log.warning("agent refused", node_id=profile.node_id, reason=err.message)
                return False
            if known is None or known.state == "dead":
                _log.info(
                    "agent admitted",
                    node_id=profile.node_id,
                    address=address,
                    device_class=profile.device_class,
                    by=discovered_by,
                )
            if discovered_by == "static":
                self._drop_channel(address, "")
            watcher = self._watchers.get(profile.node_id)
            if watcher is None or watcher.done():
                self._watchers[profile.node_id] = asyncio.create_task(
                    self._watch(profile.node_id, address)
                )
            self.changed.set()
            return True
        finally:
            self._admitting.discard(address)

    async def _get_profile(self, address: str, node_id: str) -> common_pb2.DeviceProfile | None:
        stub = agent_pb2_grpc.AgentStub(self._channel(address, node_id))
        try:
            reply: common_pb2.DeviceProfile = await stub.GetProfile(
                agent_pb2.GetProfileRequest(), timeout=5
            )
            return reply
        except grpc.aio.AioRpcError as err:
            # A spoofed record (no certificate for that node id) ends here, as UNAVAILABLE.
            _log.info(
                "agent not reachable or not who it claims",
                address=address,
                claimed=node_id or None,
                status=err.code().name,
            )
            self._drop_channel(address, node_id)
            return None

    async def _watch(self, node_id: NodeId, address: str) -> None:
        """Health-check one agent; a killed agent sends no goodbye, so silence is death."""
        from grpc_health.v1 import health_pb2 as hpb

        stub = health_pb2_grpc.HealthStub(self._channel(address, node_id))
        period = self.settings.heartbeat_s
        while True:
            try:
                reply = await stub.Check(
                    # A busy agent may answer late; only silence for dead_after_s is death.
                    hpb.HealthCheckRequest(service=""),
                    timeout=max(period, self.settings.dead_after_s / 2),
                )
                ok = reply.status == hpb.HealthCheckResponse.SERVING
                draining = reply.status == hpb.HealthCheckResponse.NOT_SERVING
            except grpc.aio.AioRpcError:
                ok = draining = False
            now = time.monotonic()
            record = self.registry.agents.get(node_id)
            if record is None or record.profile.address != address:
                return
            if draining and record.state != "dead":
                # A drain is announced, not guessed: move work away now, while the agent
                # finishes what it holds, instead of waiting out the dead-after window.
                self.registry.mark_dead(node_id, now)
                _log.warning("agent draining", node_id=node_id)
                self.changed.set()
            elif ok:
                self.registry.heard_from(node_id, now)
            else:
                state = self.registry.missed(node_id, now)
                if state is not None:
                    _log.warning("agent liveness changed", node_id=node_id, state=state)
                    self.changed.set()
            await asyncio.sleep(period)

    async def stop(self, grace: float = 2.0) -> None:
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        if self._browser is not None:
            await self._browser.stop()
        for task in [*self._watchers.values(), *self._tasks]:
            task.cancel()
        if self.restored is not None:
            self.restored.cancel()
        await self._server.stop(grace)
        if self.deployer is not None:
            await self.deployer.close()
        for channel in self._channels.values():
            await channel.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()
