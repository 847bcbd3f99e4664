"""Issue 6, done-when 1: every way to call without the right credential is refused with the
right status, and no servicer code runs for it.

Real gRPC servers on loopback, made by ``channels`` exactly as the daemons make them (mutual TLS,
the coordinator's TLS-only enrolment port, the auth interceptor), with servicers that count
their calls: a refused call must leave every counter at zero.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from doramesh import channels
from doramesh.security import tokens
from doramesh.security.authority import FleetAuthority
from doramesh.security.ca import FleetCA, key_pem, make_csr, new_key
from doramesh.security.credentials import Credentials
from doramesh.security.enrolment import EnrolmentServicer, enrol, token_credentials
from doramesh.security.identity import Identity, server_name
from doramesh.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
)

FLEET = "auth-test"


@dataclass
class Calls:
    """Servicer invocations, by name: the proof that a refused call ran no servicer code."""

    counts: dict[str, int] = field(default_factory=dict)

    def hit(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class CountingAgent(agent_pb2_grpc.AgentServicer):
    def __init__(self, calls: Calls, node_id: str) -> None:
        self.calls, self.node_id = calls, node_id

    async def GetProfile(self, request: Any, context: Any) -> common_pb2.DeviceProfile:
        self.calls.hit("Agent.GetProfile")
        return common_pb2.DeviceProfile(node_id=self.node_id)


class CountingCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def Fleet(self, request: Any, context: Any) -> coordinator_pb2.FleetView:
        self.calls.hit("Coordinator.Fleet")
        return coordinator_pb2.FleetView()


class CountingEnrolment(EnrolmentServicer):
    def __init__(self, authority: FleetAuthority, calls: Calls) -> None:
        super().__init__(authority)
        self.calls = calls

    async def Enrol(self, request: Any, context: Any) -> security_pb2.EnrolResponse:
        self.calls.hit("Enrolment.Enrol")
        return await super().Enrol(request, context)  # type: ignore[no-any-return]


@dataclass
class Mesh:
    authority: FleetAuthority
    calls: Calls
    coordinator: str  # mutual TLS
    enrol: str  # server-authenticated TLS: enrolment and app tokens
    agent: str  # mutual TLS, certificate for node "pi-1"

    def creds(self, role: Any, name: str) -> Credentials:
        return Credentials.issued_by(self.authority.ca, Identity(FLEET, role, name))


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    authority, tmp = FleetAuthority.ephemeral(FLEET)
    calls = Calls()
    ca = authority.ca
    coord = Credentials.issued_by(ca, Identity(FLEET, "coordinator", "coordinator"))
    server = channels.create_server("coordinator", credentials=coord, authority=authority)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(CountingCoordinator(calls), server)
    security_pb2_grpc.add_EnrolmentServicer_to_server(CountingEnrolment(authority, calls), server)
    coordinator = channels.bind(server, "127.0.0.1:0")
    enrol_address = channels.bind(server, "127.0.0.1:0", tls_only=True)
    agent_creds = Credentials.issued_by(ca, Identity(FLEET, "agent", "pi-1"))
    agent_server = channels.create_server("agent", credentials=agent_creds)
    agent_pb2_grpc.add_AgentServicer_to_server(CountingAgent(calls, "pi-1"), agent_server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, agent_server)
    agent = channels.bind(agent_server, "127.0.0.1:0")
    await server.start()
    await agent_server.start()
    try:
        yield Mesh(authority, calls, coordinator, enrol_address, agent)
    finally:
        await server.stop(0)
        await agent_server.stop(0)
        tmp.cleanup()


async def _get_profile(
    address: str, creds: Credentials | None, *, pin: str | None = None
) -> grpc.StatusCode:
    async with channels.create_channel(address, credentials=creds, server_name=pin) as channel:
        try:
            await agent_pb2_grpc.AgentStub(channel).GetProfile(
                agent_pb2.GetProfileRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


async def _health(address: str, creds: Credentials | None) -> grpc.StatusCode:
    async with channels.create_channel(address, credentials=creds) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


async def _fleet(address: str, creds: Credentials | None) -> grpc.StatusCode:
    async with channels.create_channel(address, credentials=creds) as channel:
        try:
            await coordinator_pb2_grpc.CoordinatorStub(channel).Fleet(
                coordinator_pb2.FleetRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


async def _enrol_raw(address: str, ca_pem: bytes, token: str, node_id: str) -> grpc.StatusCode:
    creds = Credentials(ca_pem, bearer_token=token)
    csr = make_csr(new_key(), node_id)
    async with channels.create_channel(address, credentials=creds) as channel:
        try:
            await security_pb2_grpc.EnrolmentStub(channel).Enrol(
                security_pb2.EnrolRequest(node_id=node_id, csr_pem=csr), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


# -- the right credentials work (so the counters below prove something) -----------------------


async def test_enrolled_peers_are_served(mesh: Mesh) -> None:
    assert await _get_profile(mesh.agent, mesh.creds("coordinator", "coordinator")) == (
        grpc.StatusCode.OK
    )
    assert await _fleet(mesh.coordinator, mesh.creds("app", "dashboard")) == grpc.StatusCode.OK
    assert mesh.calls.counts == {"Agent.GetProfile": 1, "Coordinator.Fleet": 1}
    assert await _health(mesh.agent, mesh.creds("agent", "pi-2")) == grpc.StatusCode.OK


# -- handshake refusals: UNAVAILABLE at the client, nothing reaches a servicer ----------------


async def test_insecure_client_is_refused(mesh: Mesh) -> None:
    assert await _get_profile(mesh.agent, None) == grpc.StatusCode.UNAVAILABLE
    assert await _fleet(mesh.coordinator, None) == grpc.StatusCode.UNAVAILABLE
    assert mesh.calls.total == 0


async def test_client_without_a_certificate_is_refused(mesh: Mesh) -> None:
    no_cert = Credentials(mesh.authority.ca.cert_pem)  # trusts the CA, presents nothing
    assert await _get_profile(mesh.agent, no_cert) == grpc.StatusCode.UNAVAILABLE
    assert await _fleet(mesh.coordinator, no_cert) == grpc.StatusCode.UNAVAILABLE
    assert mesh.calls.total == 0


async def test_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    other = FleetCA.create(FLEET)  # same fleet id, another CA: a stranger's "fleet"
    stranger = Credentials.issued_by(other, Identity(FLEET, "coordinator", "coordinator"))
    # It trusts our CA (so the client side of the handshake would pass): the server refuses.
    stranger = Credentials(
        mesh.authority.ca.cert_pem, stranger.identity, stranger.cert_pem, stranger.key_pem
    )
    assert await _get_profile(mesh.agent, stranger) == grpc.StatusCode.UNAVAILABLE
    app = Credentials.issued_by(other, Identity(FLEET, "app", "app"))
    app = Credentials(mesh.authority.ca.cert_pem, app.identity, app.cert_pem, app.key_pem)
    assert await _fleet(mesh.coordinator, app) == grpc.StatusCode.UNAVAILABLE
    assert mesh.calls.total == 0


async def test_expired_certificate_is_refused(mesh: Mesh) -> None:
    identity = Identity(FLEET, "coordinator", "coordinator")
    key, cert = mesh.authority.ca.issue(
        identity,
        valid_for=dt.timedelta(hours=1),
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
    )
    expired = Credentials(mesh.authority.ca.cert_pem, identity, cert, key)
    assert await _get_profile(mesh.agent, expired) == grpc.StatusCode.UNAVAILABLE
    assert mesh.calls.total == 0


async def test_server_whose_certificate_is_for_another_node_is_refused(mesh: Mesh) -> None:
    """The coordinator dials an announced agent pinned to the node id it announced: the agent
    at that address holds a certificate for pi-1, so a claim to be pi-9 fails the handshake."""
    coordinator = mesh.creds("coordinator", "coordinator")
    pin = server_name("agent", "pi-9")
    assert await _get_profile(mesh.agent, coordinator, pin=pin) == grpc.StatusCode.UNAVAILABLE
    assert mesh.calls.total == 0
    good_pin = server_name("agent", "pi-1")
    assert await _get_profile(mesh.agent, coordinator, pin=good_pin) == grpc.StatusCode.OK


# -- valid certificate, wrong role: PERMISSION_DENIED ----------------------------------------


async def test_wrong_role_is_permission_denied(mesh: Mesh) -> None:
    assert await _get_profile(mesh.agent, mesh.creds("app", "app")) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert await _fleet(mesh.coordinator, mesh.creds("agent", "pi-2")) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Another agent reaches an agent on the data path only (Forward, SyncGradients).
    assert await _get_profile(mesh.agent, mesh.creds("agent", "pi-2")) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert await _fleet(mesh.coordinator, mesh.creds("planner", "planner")) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert mesh.calls.total == 0


async def test_enrolment_is_not_served_over_mutual_tls(mesh: Mesh) -> None:
    token = mesh.authority.join_token()
    creds = mesh.creds("agent", "pi-2")
    creds = Credentials(creds.ca_pem, creds.identity, creds.cert_pem, creds.key_pem, token)
    async with channels.create_channel(mesh.coordinator, credentials=creds) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await security_pb2_grpc.EnrolmentStub(channel).Enrol(
                security_pb2.EnrolRequest(node_id="pi-2", csr_pem=make_csr(new_key(), "pi-2")),
                timeout=5,
            )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert mesh.calls.total == 0


# -- tokens: UNAUTHENTICATED ------------------------------------------------------------------


async def test_enrolment_without_a_token_is_unauthenticated(mesh: Mesh) -> None:
    ca = mesh.authority.ca.cert_pem
    assert await _enrol_raw(mesh.enrol, ca, "", "pi-2") == grpc.StatusCode.UNAUTHENTICATED
    assert await _enrol_raw(mesh.enrol, ca, "not-a-token", "pi-2") == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert mesh.calls.total == 0


async def test_expired_join_token_is_unauthenticated(mesh: Mesh) -> None:
    expired = mesh.authority.join_token(ttl_s=-1)
    ca = mesh.authority.ca.cert_pem
    assert await _enrol_raw(mesh.enrol, ca, expired, "pi-2") == grpc.StatusCode.UNAUTHENTICATED
    assert mesh.calls.total == 0


async def test_forged_join_token_is_unauthenticated(mesh: Mesh) -> None:
    genuine = tokens.peek(mesh.authority.join_token())
    forged = tokens.issue(b"guessed secret" * 3, genuine)
    ca = mesh.authority.ca.cert_pem
    assert await _enrol_raw(mesh.enrol, ca, forged, "pi-2") == grpc.StatusCode.UNAUTHENTICATED
    assert mesh.calls.total == 0


async def test_replayed_join_token_is_unauthenticated(mesh: Mesh) -> None:
    token = mesh.authority.join_token()
    creds = await enrol(mesh.enrol, token, "pi-2")
    assert creds.identity == Identity(FLEET, "agent", "pi-2")
    assert mesh.calls.counts == {"Enrolment.Enrol": 1}
    ca = mesh.authority.ca.cert_pem
    assert await _enrol_raw(mesh.enrol, ca, token, "pi-3") == grpc.StatusCode.UNAUTHENTICATED
    assert mesh.calls.counts == {"Enrolment.Enrol": 1}
    # The enrolled certificate is a working fleet identity: pi-1 accepts pi-2's handshake.
    assert await _health(mesh.agent, creds) == grpc.StatusCode.OK


async def test_a_token_bound_to_a_node_id_enrols_only_that_node(mesh: Mesh) -> None:
    token = mesh.authority.join_token(node_id="pi-7")
    creds = await enrol(mesh.enrol, token, "")
    assert creds.identity is not None and creds.identity.name == "pi-7"


async def test_app_token_on_the_tls_port(mesh: Mesh) -> None:
    ca = mesh.authority.ca.cert_pem
    no_token = Credentials(ca)
    assert await _fleet(mesh.enrol, no_token) == grpc.StatusCode.UNAUTHENTICATED
    expired = Credentials(ca, bearer_token=mesh.authority.app_token(ttl_s=-1))
    assert await _fleet(mesh.enrol, expired) == grpc.StatusCode.UNAUTHENTICATED
    join_as_app = Credentials(ca, bearer_token=mesh.authority.join_token())
    assert await _fleet(mesh.enrol, join_as_app) == grpc.StatusCode.UNAUTHENTICATED
    assert mesh.calls.total == 0
    # The app fetches the CA its token pins from the port itself, then is served.
    app = token_credentials(mesh.enrol, mesh.authority.app_token(name="dashboard"))
    assert app.ca_pem == ca
    assert await _fleet(mesh.enrol, app) == grpc.StatusCode.OK
    assert mesh.calls.counts == {"Coordinator.Fleet": 1}


async def test_enrolment_refuses_a_port_that_does_not_present_the_pinned_ca(mesh: Mesh) -> None:
    from doramesh.errors import Unavailable

    other = FleetAuthority(FleetCA.create(FLEET), b"x" * 32, tokens.UsedTokens(None))
    token = other.join_token()
    with pytest.raises(Unavailable):
        await enrol(mesh.enrol, token, "pi-2")
    assert mesh.calls.total == 0


def test_expired_fixture_cert_really_expired() -> None:
    """Guard for test_expired_certificate_is_refused: the cert it makes is past not_after."""
    from cryptography import x509

    ca = FleetCA.create(FLEET)
    _, cert = ca.issue(
        Identity(FLEET, "app", "a"),
        valid_for=dt.timedelta(hours=1),
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
    )
    parsed = x509.load_pem_x509_certificate(cert)
    assert parsed.not_valid_after_utc.timestamp() < time.time()
    assert key_pem(new_key()).startswith(b"-----BEGIN PRIVATE KEY-----")


# -- secure by default; --insecure is loud ----------------------------------------------------


async def test_an_insecure_server_says_so() -> None:
    from structlog.testing import capture_logs

    from doramesh.fleet_cli import warn_insecure

    with capture_logs() as logs:
        warn_insecure("agent")
        server = channels.create_server("agent", credentials=None)
        channels.bind(server, "127.0.0.1:0")
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 2
    assert all("INSECURE" in e["event"] for e in warnings)


def test_a_daemon_without_credentials_refuses_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "DORAMESH_STATE_DIR": str(tmp_path / "empty")}
    env.pop("DORAMESH_INSECURE", None)
    out = subprocess.run(
        [sys.executable, "-m", "doramesh", "planner", "--listen", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert b"--insecure" in out.stderr and b"fleet init" in out.stderr


async def test_the_sdk_trusts_only_the_coordinators_certificate(mesh: Mesh) -> None:
    """A fleet member (here an agent) answering at the address an app dials is not the
    coordinator: the SDK pins the coordinator's name, so the handshake fails."""
    from doramesh.errors import Unavailable
    from doramesh.sdk import AsyncClient

    app = mesh.creds("app", "dashboard")
    async with AsyncClient(mesh.agent, timeout=5, credentials=app) as client:
        with pytest.raises(Unavailable):
            await client.fleet()
    assert mesh.calls.total == 0
    async with AsyncClient(mesh.coordinator, timeout=5, credentials=app) as client:
        assert await client.fleet() == []
    assert mesh.calls.counts == {"Coordinator.Fleet": 1}
