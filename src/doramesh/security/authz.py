"""Who may call what: one table, checked by the server interceptor before any servicer runs.

Pure: a decision takes the RPC's method and the identity the TLS peer proved, and returns a
refusal (status and message) or None to let the call through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from doramesh.errors import Status
from doramesh.security.identity import ROLES, Identity, Role

HEALTH_SERVICE = "grpc.health.v1.Health"
ENROL_SERVICE = "doramesh.v1.Enrolment"
COORDINATOR_SERVICE = "doramesh.v1.Coordinator"

#: Roles allowed on each service over mutual TLS. A service not listed is refused.
SERVICE_ROLES: dict[str, frozenset[Role]] = {
    # Stage control (load, unload, rates, cancels, stats, checkpoints) is the coordinator's;
    # agents reach each other only on the data path (METHOD_ROLES).
    "doramesh.v1.Agent": frozenset({"coordinator"}),
    # The client API is for apps (an app certificate, or an app token on the TLS-only port).
    COORDINATOR_SERVICE: frozenset({"app"}),
    # Stage weights go to agents.
    "doramesh.v1.WeightStore": frozenset({"agent", "coordinator"}),
    "doramesh.v1.Planner": frozenset({"coordinator"}),
    HEALTH_SERVICE: frozenset(ROLES),
}


#: Methods whose roles differ from their service's: the peer-to-peer data path.
METHOD_ROLES: dict[str, frozenset[Role]] = {
    # Activations (and, in training, gradients on the way back) flow stage to stage.
    "/doramesh.v1.Agent/Forward": frozenset({"coordinator", "agent"}),
    # A replica sends its gradients to its group's rank 0.
    "/doramesh.v1.Agent/SyncGradients": frozenset({"coordinator", "agent"}),
}


@dataclass(frozen=True, slots=True)
class Refusal:
    status: Status
    message: str


def service_of(method: str) -> str:
    """'/doramesh.v1.Agent/Forward' -> 'doramesh.v1.Agent'."""
    return method.lstrip("/").split("/", 1)[0]


def decide_mtls(method: str, peer: Identity | None, fleet_id: str) -> Refusal | None:
    """A call on a mutual-TLS port: the handshake proved the peer holds a certificate of this
    fleet's CA; its URI SAN decides what it may call."""
    if peer is None:
        return Refusal(Status.PERMISSION_DENIED, "certificate carries no doramesh identity")
    if fleet_id and peer.fleet_id != fleet_id:
        return Refusal(Status.PERMISSION_DENIED, f"{peer} is not a member of fleet {fleet_id}")
    service = service_of(method)
    allowed = METHOD_ROLES.get(method, SERVICE_ROLES.get(service, frozenset()))
    if peer.role not in allowed:
        return Refusal(Status.PERMISSION_DENIED, f"role {peer.role} may not call {method}")
    return None


def token_kind(method: str) -> Literal["join", "app", ""] | None:
    """What a call on the server-authenticated TLS port (no client certificate) must carry:
    nothing for health, a join token for enrolment, an app token for the client API; None if
    the service is never reachable without a certificate."""
    service = service_of(method)
    if service == HEALTH_SERVICE:
        return ""
    if service == ENROL_SERVICE:
        return "join"
    if service == COORDINATOR_SERVICE:
        return "app"
    return None
