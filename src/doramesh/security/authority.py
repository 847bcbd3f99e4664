"""The fleet's authority, held by the coordinator: the CA, the token secret and the record of
redeemed join tokens. It issues tokens, checks them, and signs enrolled devices' CSRs."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from doramesh.errors import InvalidArgument, Unauthenticated
from doramesh.security import tokens
from doramesh.security.ca import TOKEN_KEY, USED_TOKENS, FleetCA, cert_pem
from doramesh.security.identity import Identity, valid_name
from doramesh.security.tokens import TokenClaims, UsedTokens

DEFAULT_JOIN_TTL_S = 3600.0
DEFAULT_APP_TTL_S = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class FleetAuthority:
    ca: FleetCA
    secret: bytes
    used: UsedTokens

    @classmethod
    def load(cls, state_dir: Path) -> FleetAuthority:
        ca = FleetCA.load(state_dir)
        secret = (state_dir / TOKEN_KEY).read_bytes().strip()
        return cls(ca, secret, UsedTokens(state_dir / USED_TOKENS))

    @classmethod
    def init(cls, state_dir: Path, fleet_id: str) -> FleetAuthority:
        FleetCA.init_state_dir(state_dir, fleet_id)
        return cls.load(state_dir)

    @classmethod
    def ephemeral(cls, fleet_id: str) -> tuple[FleetAuthority, tempfile.TemporaryDirectory[str]]:
        """A throwaway fleet in a temporary directory (the demo, LocalFleet, tests)."""
        tmp = tempfile.TemporaryDirectory(prefix="doramesh-ca-")
        return cls.init(Path(tmp.name), fleet_id), tmp

    @property
    def fleet_id(self) -> str:
        return self.ca.fleet_id

    # -- tokens --------------------------------------------------------------------------

    def join_token(self, *, ttl_s: float = DEFAULT_JOIN_TTL_S, node_id: str = "") -> str:
        if node_id and not valid_name(node_id):
            raise InvalidArgument(f"invalid node id {node_id!r}")
        claims = tokens.new_claims(
            "join",
            fleet_id=self.fleet_id,
            ca_fingerprint=self.ca.fingerprint,
            ttl_s=ttl_s,
            subject=node_id,
        )
        return tokens.issue(self.secret, claims)

    def app_token(self, *, ttl_s: float = DEFAULT_APP_TTL_S, name: str = "app") -> str:
        if not valid_name(name):
            raise InvalidArgument(f"invalid app name {name!r}")
        claims = tokens.new_claims(
            "app",
            fleet_id=self.fleet_id,
            ca_fingerprint=self.ca.fingerprint,
            ttl_s=ttl_s,
            subject=name,
        )
        return tokens.issue(self.secret, claims)

    def check_join(self, token: str) -> TokenClaims:
        """A genuine, unexpired, unredeemed join token of this fleet (Unauthenticated if not).
        Does not redeem it: a request refused later must not burn the token."""
        claims = self._verify(token, "join")
        if self.used.is_used(claims.token_id):
            raise Unauthenticated("join token was already used")
        return claims

    def check_app(self, token: str) -> Identity:
        claims = self._verify(token, "app")
        return Identity(self.fleet_id, "app", claims.subject or "app")

    def _verify(self, token: str, kind: tokens.TokenKind) -> TokenClaims:
        claims = tokens.verify(self.secret, token, kind)
        if claims.fleet_id != self.fleet_id or claims.ca_fingerprint != self.ca.fingerprint:
            raise Unauthenticated("token was issued for another fleet")
        return claims

    # -- enrolment -----------------------------------------------------------------------

    def enrol(self, token: str, requested_node_id: str, csr_pem: bytes) -> tuple[Identity, bytes]:
        """Redeem a join token and sign the device's CSR for its node id."""
        claims = self.check_join(token)
        node_id = claims.subject or requested_node_id
        if not valid_name(node_id):
            raise InvalidArgument(f"invalid node id {node_id!r}")
        if claims.subject and requested_node_id and requested_node_id != claims.subject:
            raise InvalidArgument(
                f"this token enrols node {claims.subject!r}, not {requested_node_id!r}"
            )
        identity = Identity(self.fleet_id, "agent", node_id)
        # Validate the CSR before redeeming: a malformed request must not burn the token.
        cert = self.ca.sign_csr(csr_pem, identity)
        self.used.redeem(claims)
        return identity, cert_pem(cert)
