"""Join tokens (one-time, expiring: enrol one device) and app tokens (expiring bearer tokens for
the client API), both HMAC-SHA256 signed with the fleet's token secret.

A token is ``dm1.<claims>.<mac>``, both parts base64url. Its claims are readable without the
secret on purpose: a device reads the CA fingerprint it must pin from its join token before it
trusts anything. Only the coordinator, which holds the secret, can tell a token is genuine.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from doramesh.errors import Unauthenticated
from doramesh.security.ca import write_secret

TokenKind = Literal["join", "app"]
PREFIX = "dm1"
#: Tokens longer than this are refused before any parsing (metadata is attacker-controlled).
MAX_TOKEN_CHARS = 2048
#: Redeemed join tokens remembered; an entry is dropped once its token has expired anyway.
MAX_USED_TOKENS = 100_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class TokenClaims:
    kind: TokenKind
    fleet_id: str
    token_id: str
    expires_at: float
    #: sha256 of the fleet CA certificate, so an enrolling device can pin it.
    ca_fingerprint: str
    #: For a join token, the node id it enrols ("" lets the device choose its own);
    #: for an app token, the app's name.
    subject: str = ""


def issue(secret: bytes, claims: TokenClaims) -> str:
    body = _b64(json.dumps(asdict(claims), sort_keys=True).encode())
    mac = hmac.new(secret, f"{PREFIX}.{body}".encode(), hashlib.sha256).digest()
    return f"{PREFIX}.{body}.{_b64(mac)}"


def new_claims(
    kind: TokenKind,
    *,
    fleet_id: str,
    ca_fingerprint: str,
    ttl_s: float,
    subject: str = "",
    now: float | None = None,
) -> TokenClaims:
    return TokenClaims(
        kind=kind,
        fleet_id=fleet_id,
        token_id=secrets.token_hex(16),
        expires_at=(time.time() if now is None else now) + ttl_s,
        ca_fingerprint=ca_fingerprint,
        subject=subject,
    )


def peek(token: str) -> TokenClaims:
    """The claims of a token, NOT verified: only for what a device needs before enrolling."""
    try:
        prefix, body, _mac = token.strip().split(".")
        if prefix != PREFIX or len(token) > MAX_TOKEN_CHARS:
            raise ValueError(prefix)
        raw = json.loads(_unb64(body))
        return TokenClaims(
            kind=raw["kind"],
            fleet_id=str(raw["fleet_id"]),
            token_id=str(raw["token_id"]),
            expires_at=float(raw["expires_at"]),
            ca_fingerprint=str(raw["ca_fingerprint"]),
            subject=str(raw.get("subject", "")),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise Unauthenticated("malformed token") from err


def verify(secret: bytes, token: str, kind: TokenKind, *, now: float | None = None) -> TokenClaims:
    """The claims of a genuine, unexpired token of ``kind``; Unauthenticated otherwise."""
    token = token.strip()
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        raise Unauthenticated("malformed token")
    prefix, body, mac = token.split(".")
    expected = hmac.new(secret, f"{prefix}.{body}".encode(), hashlib.sha256).digest()
    try:
        given = _unb64(mac)
    except ValueError as err:
        raise Unauthenticated("malformed token") from err
    if prefix != PREFIX or not hmac.compare_digest(expected, given):
        raise Unauthenticated("token signature is not valid for this fleet")
    claims = peek(token)
    if claims.kind != kind:
        raise Unauthenticated(f"a {claims.kind} token cannot be used here (need a {kind} token)")
    if (time.time() if now is None else now) >= claims.expires_at:
        raise Unauthenticated("token has expired")
    return claims


class UsedTokens:
    """Join tokens already redeemed, persisted so a replay is refused across restarts.

    Bounded: an entry is forgotten once its token has expired (it would be refused as expired
    anyway), and past ``max_entries`` live entries new redemptions are refused.
    """

    def __init__(self, path: Path | None, *, max_entries: int = MAX_USED_TOKENS) -> None:
        self._path = path
        self._max = max_entries
        self._lock = threading.Lock()
        self._used: dict[str, float] = {}
        if path is not None and path.exists():
            raw = json.loads(path.read_text() or "{}")
            self._used = {str(k): float(v) for k, v in raw.items()}

    def is_used(self, token_id: str) -> bool:
        return token_id in self._used

    def redeem(self, claims: TokenClaims, *, now: float | None = None) -> None:
        """Mark the token used; Unauthenticated if it already was (a replay)."""
        now = time.time() if now is None else now
        with self._lock:
            if claims.token_id in self._used:
                raise Unauthenticated("join token was already used")
            self._used = {k: exp for k, exp in self._used.items() if exp > now}
            if len(self._used) >= self._max:
                raise Unauthenticated("too many outstanding join tokens redeemed; retry later")
            self._used[claims.token_id] = claims.expires_at
            if self._path is not None:
                write_secret(self._path, json.dumps(self._used).encode())

    def __len__(self) -> int:
        return len(self._used)
