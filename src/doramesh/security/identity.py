"""Who a certificate says its holder is: a fleet, a role and a name. Pure, no I/O.

Every certificate the fleet CA signs carries one URI SAN,
``doramesh://fleet/<fleet_id>/node/<node_id>`` for an agent and
``doramesh://fleet/<fleet_id>/<role>/<name>`` for the other roles, which servers read from the
TLS peer to authorise each RPC. Service certificates also carry DNS SANs under the reserved
``.invalid`` TLD, which clients pin with ``grpc.ssl_target_name_override``: gRPC's own hostname
check then proves, during the handshake, that the server holds a certificate for the node id (or
role) the client meant to reach.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal, get_args

Role = Literal["agent", "coordinator", "planner", "app"]
ROLES: tuple[Role, ...] = get_args(Role)

#: Node ids, fleet ids and app names: what a hostname-like label allows, bounded.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_URI = re.compile(r"^doramesh://fleet/([^/]+)/(node|coordinator|planner|app)/([^/]+)$")

#: DNS name every service certificate (agent, coordinator, planner) carries: a client that dials
#: "some fleet member" without knowing which (a peer stream, a weight fetch) pins this one.
MEMBER_DNS = "member.doramesh.invalid"


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


@dataclass(frozen=True, slots=True)
class Identity:
    fleet_id: str
    role: Role
    name: str

    def __post_init__(self) -> None:
        if not valid_name(self.fleet_id):
            raise ValueError(f"invalid fleet id {self.fleet_id!r}")
        if not valid_name(self.name):
            raise ValueError(f"invalid {self.role} name {self.name!r}")
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}")

    @property
    def uri(self) -> str:
        segment = "node" if self.role == "agent" else self.role
        return f"doramesh://fleet/{self.fleet_id}/{segment}/{self.name}"

    @property
    def dns_names(self) -> tuple[str, ...]:
        """DNS SANs: the pinnable server name first; apps are never servers and get none."""
        if self.role == "app":
            return ()
        return (server_name(self.role, self.name), MEMBER_DNS)

    def __str__(self) -> str:
        return self.uri


def server_name(role: Role, name: str = "") -> str:
    """The DNS SAN a client pins to reach this role (and, for an agent, this node id).

    A node id is hashed into the label so any valid id (dots, capitals) maps to one fixed,
    case-proof DNS label.
    """
    if role == "agent":
        digest = hashlib.sha256(name.encode()).hexdigest()[:40]
        return f"n{digest}.node.doramesh.invalid"
    return f"{role}.doramesh.invalid"


def parse_uri(uri: str) -> Identity | None:
    """The identity in a SAN URI, or None for anything that is not a doramesh identity."""
    match = _URI.match(uri)
    if match is None:
        return None
    fleet_id, segment, name = match.groups()
    role: Role = "agent" if segment == "node" else segment  # type: ignore[assignment]
    try:
        return Identity(fleet_id, role, name)
    except ValueError:
        return None
