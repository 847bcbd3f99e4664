"""The server interceptor that authorises every RPC before its servicer runs.

A grpc.aio interceptor sees only the method name, not the peer, so it wraps the handler: the
wrapper reads the TLS peer's identity (or the bearer token), refuses with the table's status,
and only then calls the servicer. The wrapper also makes the server's own credentials the ones
outgoing channels use while the call runs (peer streams, weight fetches), so several services
in one process (the embedded fleet) each dial with their own certificate.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import structlog

from doramesh.errors import DoraMeshError, Status
from doramesh.security import authz
from doramesh.security.authority import FleetAuthority
from doramesh.security.credentials import CURRENT_CREDENTIALS, Credentials
from doramesh.security.identity import Identity, parse_uri

_log = structlog.get_logger("auth")

AUTHORIZATION = "authorization"


def bearer_token(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The token of an ``authorization: Bearer <token>`` header, or ''."""
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[bool, Identity | None]:
    """(whether the peer presented a certificate, the doramesh identity in it)."""
    auth = context.auth_context()
    if "x509_pem_cert" not in auth and "x509_subject_alternative_name" not in auth:
        return False, None
    for raw in auth.get("peer_uri", []):
        identity = parse_uri(raw.decode(errors="replace"))
        if identity is not None:
            return True, identity
    return True, None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, credentials: Credentials, authority: FleetAuthority | None = None) -> None:
        self._credentials = credentials
        self._authority = authority

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _guard(handler, handler_call_details.method, self._admit)

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Aborts the call unless the peer may make it; on success, runs it as this server."""
        refusal = self._refusal(method, context)
        if refusal is not None:
            _log.warning(
                "call refused",
                rpc=method,
                status=refusal.status.name,
                reason=refusal.message,
                peer=context.peer(),
            )
            await context.abort(refusal.status.grpc_code, refusal.message)
        CURRENT_CREDENTIALS.set(self._credentials)

    def _refusal(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> authz.Refusal | None:
        has_cert, identity = peer_identity(context)
        if has_cert:
            refusal = authz.decide_mtls(method, identity, self._credentials.fleet_id)
            if refusal is None:
                structlog.contextvars.bind_contextvars(peer=str(identity))
            return refusal
        kind = authz.token_kind(method)
        if kind is None or (kind and self._authority is None):
            service = authz.service_of(method)
            return authz.Refusal(Status.PERMISSION_DENIED, f"{service} needs a client certificate")
        if not kind:
            return None
        token = bearer_token(context)
        if not token:
            return authz.Refusal(Status.UNAUTHENTICATED, f"missing {kind} token")
        assert self._authority is not None
        try:
            if kind == "join":
                self._authority.check_join(token)
            else:
                structlog.contextvars.bind_contextvars(peer=str(self._authority.check_app(token)))
        except DoraMeshError as err:
            return authz.Refusal(err.status, err.message)
        return None


Admit = Callable[[str, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]


def _guard(handler: grpc.RpcMethodHandler, method: str, admit: Admit) -> grpc.RpcMethodHandler:
    """The same handler with ``admit`` run first, for all four kinds of RPC."""
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await admit(method, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: Any) -> Any:
            await admit(method, context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner = handler.unary_stream if handler.unary_stream is not None else handler.stream_stream
    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )
    if inspect.isasyncgenfunction(inner) or _is_wrapped_asyncgen(inner):

        async def streaming_gen(request: Any, context: Any) -> AsyncIterator[Any]:
            await admit(method, context)
            async for item in inner(request, context):
                yield item

        return factory(streaming_gen, handler.request_deserializer, handler.response_serializer)

    async def streaming(request: Any, context: Any) -> Any:
        # Handlers that write with context.write() (grpc's health Watch).
        await admit(method, context)
        return await inner(request, context)

    return factory(streaming, handler.request_deserializer, handler.response_serializer)


def _is_wrapped_asyncgen(fn: Any) -> bool:
    target = inspect.unwrap(getattr(fn, "__func__", fn))
    return inspect.isasyncgenfunction(target)
