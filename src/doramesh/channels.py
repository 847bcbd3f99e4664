"""Every gRPC server and channel of doramesh is made here.

Message limits, keepalive, interceptors and mutual TLS are decided in this one module, so a
change of transport policy is one edit. Limits are raised deliberately, never unbounded:
activations travel in ~1 MiB chunks, so a frame never needs more than ``MAX_MESSAGE_BYTES``.

Security: a server made with credentials serves mutual TLS (a client certificate from the fleet
CA is required by the handshake) and authorises every call by the peer's role before its
servicer runs; ``bind(..., tls_only=True)`` adds the coordinator's server-authenticated port
where only enrolment (join token), health and the client API (app token) are reachable. A
channel presents the caller's certificate and pins the server's name (``server_name``: a node
id's DNS SAN proves the peer is that node). Which credentials: the ``credentials`` argument;
else those of the server whose call is running (see ``security.interceptor``) or set by
``acting_as``; else the process default (``set_default_credentials``, made once by the CLI).
With none at all, servers and channels are plaintext and say so loudly: development only.
"""

from __future__ import annotations

import os
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import grpc
import grpc.aio
import structlog

from doramesh.security.authority import FleetAuthority
from doramesh.security.credentials import CURRENT_CREDENTIALS, Credentials
from doramesh.security.identity import MEMBER_DNS, server_name
from doramesh.security.interceptor import AuthInterceptor

#: Size of one activation or weight chunk on the wire.
CHUNK_BYTES = 1 << 20
#: Largest message any doramesh endpoint sends or accepts: one chunk plus headers, or one
#: client-API tensor. Larger client tensors must use the streaming API.
MAX_MESSAGE_BYTES = 64 << 20
#: Default deadline for control-plane RPCs (profile, load stage, plan) in seconds.
DEFAULT_RPC_TIMEOUT_S = 30.0

#: How long a keepalive ping may wait for its answer before the connection is closed, seconds
#: (``DORAMESH_KEEPALIVE_TIMEOUT_S`` overrides it). The answer queues behind the data already in
#: the connection's TCP send buffer, so it must outlast draining that buffer on the slowest link
#: the fleet runs: with 5 s, a hop carrying gpt2-medium's 6.4 MB of logits over a loaded
#: 5 Mbit/s medium was closed as dead mid-transfer ("Connection reset by peer") while both ends
#: were healthy. A dead peer is still found within keepalive time + this; the coordinator's own
#: health checks are separate.
KEEPALIVE_TIMEOUT_S = float(os.environ.get("DORAMESH_KEEPALIVE_TIMEOUT_S", "30"))

_COMMON_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.max_concurrent_streams", 256),
    ("grpc.so_reuseport", 0),
]
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *_COMMON_OPTIONS,
    ("grpc.enable_retries", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class LoggingInterceptor(grpc.aio.ServerInterceptor):
    """Binds the RPC name and a request id to structlog's context; logs failures and slow calls."""

    def __init__(self, service: str) -> None:
        self._log = structlog.get_logger(service)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        structlog.contextvars.bind_contextvars(rpc=method, rpc_id=uuid.uuid4().hex[:8])
        start = time.perf_counter()
        handler = await continuation(handler_call_details)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if elapsed_ms > 1_000:
            self._log.debug("slow handler lookup", ms=round(elapsed_ms, 1))
        return handler


class Unset:
    pass


#: "Not given": resolve the credentials from the running call, then the process default.
UNSET: Final = Unset()
_log = structlog.get_logger("channels")
_process_default: Credentials | None = None
#: Credentials each server was made with, for ``bind``.
_server_credentials: weakref.WeakKeyDictionary[Any, Credentials | None] = (
    weakref.WeakKeyDictionary()
)


def set_default_credentials(credentials: Credentials | None) -> Credentials | None:
    """Set what this process presents when nothing more specific applies; returns the old."""
    global _process_default
    previous, _process_default = _process_default, credentials
    return previous


@contextmanager
def acting_as(credentials: Credentials | None) -> Iterator[None]:
    """Servers made and channels opened inside this block use ``credentials`` (one service's
    start in a process that hosts several)."""
    token = CURRENT_CREDENTIALS.set(credentials)
    try:
        yield
    finally:
        CURRENT_CREDENTIALS.reset(token)


def resolve_credentials(credentials: Credentials | Unset | None = UNSET) -> Credentials | None:
    if not isinstance(credentials, Unset):
        return credentials
    current = CURRENT_CREDENTIALS.get()
    return current if current is not None else _process_default


def create_server(
    service: str,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    credentials: Credentials | Unset | None = UNSET,
    authority: FleetAuthority | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server with doramesh's limits and, given credentials, its auth interceptor;
    the caller adds servicers and binds ports. ``authority`` (the coordinator) checks tokens."""
    options = [
        (k, max_message_bytes if k.startswith("grpc.max_") and "message" in k else v)
        for k, v in _SERVER_OPTIONS
    ]
    creds = resolve_credentials(credentials)
    chain: list[grpc.aio.ServerInterceptor] = [LoggingInterceptor(service)]
    if creds is None:
        _log.warning(
            "INSECURE gRPC server: no TLS, no authentication; anyone on the network may call it",
            service=service,
        )
    else:
        chain.append(AuthInterceptor(creds, authority))
    server = grpc.aio.server(interceptors=[*chain, *interceptors], options=options)
    _server_credentials[server] = creds
    return server


def bind(server: grpc.aio.Server, address: str, *, tls_only: bool = False) -> str:
    """Binds ``address`` (``host:port``, port 0 for any) and returns the bound ``host:port``.

    Mutual TLS when the server has credentials; ``tls_only``: server-authenticated TLS with no
    client certificate (the coordinator's enrolment and app-token port).
    """
    host, _, port = address.rpartition(":")
    creds = _server_credentials.get(server)
    if creds is None:
        bound = server.add_insecure_port(address)
    elif tls_only:
        # The chain carries the CA so an enrolling device can find the CA its token pins.
        chain = creds.cert_pem + creds.ca_pem
        bound = server.add_secure_port(
            address, grpc.ssl_server_credentials([(creds.key_pem, chain)])
        )
    else:
        bound = server.add_secure_port(
            address,
            grpc.ssl_server_credentials(
                [(creds.key_pem, creds.cert_pem)],
                root_certificates=creds.ca_pem,
                require_client_auth=True,
            ),
        )
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    return f"{host or '127.0.0.1'}:{bound if port == '0' else port}"


def _channel_options(max_message_bytes: int, pinned_name: str | None) -> list[tuple[str, Any]]:
    options = [
        (k, max_message_bytes if k.startswith("grpc.max_") and "message" in k else v)
        for k, v in _CHANNEL_OPTIONS
    ]
    if pinned_name is not None:
        options.append(("grpc.ssl_target_name_override", pinned_name))
    return options


def _channel_credentials(creds: Credentials) -> grpc.ChannelCredentials:
    ssl = grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem or None, creds.cert_pem or None)
    if creds.bearer_token:
        return grpc.composite_channel_credentials(
            ssl, grpc.access_token_call_credentials(creds.bearer_token)
        )
    return ssl


def _pinned_name(creds: Credentials | None, name: str | None) -> str | None:
    if creds is None:
        return None
    if name is not None:
        return name
    # A token-only app talks to the coordinator; a member dials "any member of this fleet".
    return server_name("coordinator") if creds.identity is None else MEMBER_DNS


def create_channel(
    target: str,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    credentials: Credentials | Unset | None = UNSET,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to another doramesh service. ``server_name``: the DNS SAN the server's
    certificate must carry (``security.identity.server_name``); default: any fleet member."""
    creds = resolve_credentials(credentials)
    options = _channel_options(max_message_bytes, _pinned_name(creds, server_name))
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, _channel_credentials(creds), options=options)


def create_sync_channel(
    target: str,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    credentials: Credentials | Unset | None = UNSET,
    server_name: str | None = None,
) -> grpc.Channel:
    """A blocking channel (the synchronous SDK client)."""
    creds = resolve_credentials(credentials)
    options = _channel_options(max_message_bytes, _pinned_name(creds, server_name))
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, _channel_credentials(creds), options=options)
