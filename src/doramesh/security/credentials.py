"""What one party presents and trusts on a connection, and where it is kept on disk.

A state directory holds either a fleet CA (``doramesh fleet init``: the coordinator's box) or,
under ``agent/``, one enrolled device's key and certificate. Services running next to the CA
(coordinator, planner, the operator's tools) issue themselves a fresh certificate at start.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from doramesh.errors import FailedPrecondition
from doramesh.security.ca import CA_KEY, FleetCA, write_secret
from doramesh.security.identity import Identity, Role, parse_uri

NODE_DIR = "agent"
NODE_KEY = "key.pem"
NODE_CERT = "cert.pem"
NODE_CA = "ca.pem"


#: The credentials outgoing channels present, when the caller names none: set by the auth
#: interceptor for the duration of each call a server handles (and around a server's start), so
#: in-process services each dial as themselves. Unset: the process default in channels.
CURRENT_CREDENTIALS: ContextVar[Credentials | None] = ContextVar(
    "doramesh_credentials", default=None
)


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "doramesh"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A fleet CA to trust, plus this party's certificate and key and/or a bearer token.

    ``identity`` is None for an app that authenticates with a bearer token only.
    """

    ca_pem: bytes
    identity: Identity | None = None
    cert_pem: bytes = b""
    key_pem: bytes = b""
    bearer_token: str = ""

    def __repr__(self) -> str:  # never print a key or a token
        token = "yes" if self.bearer_token else "no"
        return f"Credentials(identity={self.identity}, token={token})"

    @property
    def fleet_id(self) -> str:
        return self.identity.fleet_id if self.identity is not None else ""

    @classmethod
    def issued_by(cls, ca: FleetCA, identity: Identity) -> Credentials:
        key, cert = ca.issue(identity)
        return cls(ca.cert_pem, identity, cert, key)

    @classmethod
    def from_pem(cls, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> Credentials:
        return cls(ca_pem, identity_of(cert_pem), cert_pem, key_pem)


def identity_of(cert_pem: bytes) -> Identity:
    """The doramesh identity in a certificate's URI SAN."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as err:
        raise FailedPrecondition("certificate has no subject alternative name") from err
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        identity = parse_uri(uri)
        if identity is not None:
            return identity
    raise FailedPrecondition("certificate carries no doramesh identity")


def save_node_credentials(state_dir: Path, creds: Credentials) -> Path:
    folder = state_dir / NODE_DIR
    write_secret(folder / NODE_KEY, creds.key_pem)
    write_secret(folder / NODE_CERT, creds.cert_pem)
    write_secret(folder / NODE_CA, creds.ca_pem)
    return folder


def load_node_credentials(state_dir: Path) -> Credentials | None:
    """An enrolled device's credentials, or None if this state dir has never enrolled."""
    folder = state_dir / NODE_DIR
    if not (folder / NODE_CERT).exists():
        return None
    return Credentials.from_pem(
        (folder / NODE_CA).read_bytes(),
        (folder / NODE_CERT).read_bytes(),
        (folder / NODE_KEY).read_bytes(),
    )


def holds_ca(state_dir: Path) -> bool:
    return (state_dir / CA_KEY).exists()


def service_credentials(state_dir: Path, role: Role, name: str | None = None) -> Credentials:
    """Credentials for a service or tool from a state dir: a fresh certificate if the dir holds
    the CA, else the enrolled credentials kept there."""
    if holds_ca(state_dir):
        ca = FleetCA.load(state_dir)
        return Credentials.issued_by(ca, Identity(ca.fleet_id, role, name or role))
    creds = load_node_credentials(state_dir)
    if creds is None:
        raise FailedPrecondition(
            f"{state_dir} holds neither a fleet CA nor enrolled credentials "
            "(`doramesh fleet init` on the coordinator's box, `doramesh agent --join-token` "
            "on a device, or --insecure for development)"
        )
    return creds
