"""Every gRPC server and channel of doramesh is made here.

Message limits, keepalive, interceptors and (later) mutual TLS are decided in this one module, so
a change of transport policy is one edit. Limits are raised deliberately, never unbounded:
activations travel in ~1 MiB chunks, so a frame never needs more than ``MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio
import structlog

#: Size of one activation or weight chunk on the wire.
CHUNK_BYTES = 1 << 20
#: Largest message any doramesh endpoint sends or accepts: one chunk plus headers, or one
#: client-API tensor. Larger client tensors must use the streaming API.
MAX_MESSAGE_BYTES = 64 << 20
#: Default deadline for control-plane RPCs (profile, load stage, plan) in seconds.
DEFAULT_RPC_TIMEOUT_S = 30.0

_COMMON_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
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


def create_server(
    service: str,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> grpc.aio.Server:
    """A grpc.aio server with doramesh's limits; the caller adds servicers and a port."""
    options = [
        (k, max_message_bytes if k.startswith("grpc.max_") and "message" in k else v)
        for k, v in _SERVER_OPTIONS
    ]
    return grpc.aio.server(
        interceptors=[LoggingInterceptor(service), *interceptors],
        options=options,
    )


def bind(server: grpc.aio.Server, address: str) -> str:
    """Binds ``address`` (``host:port``, port 0 for any) and returns the bound ``host:port``."""
    host, _, port = address.rpartition(":")
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    return f"{host or '127.0.0.1'}:{bound if port == '0' else port}"


def create_channel(target: str, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
    """An asyncio channel to another doramesh service."""
    options = [
        (k, max_message_bytes if k.startswith("grpc.max_") and "message" in k else v)
        for k, v in _CHANNEL_OPTIONS
    ]
    return grpc.aio.insecure_channel(target, options=options)


def create_sync_channel(target: str, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A blocking channel (the synchronous SDK client)."""
    options = [
        (k, max_message_bytes if k.startswith("grpc.max_") and "message" in k else v)
        for k, v in _CHANNEL_OPTIONS
    ]
    return grpc.insecure_channel(target, options=options)
