"""Helpers every servicer uses: typed errors become statuses in one place."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog

from doramesh.errors import DoraMeshError

_log = structlog.get_logger("servicing")

R = TypeVar("R")


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], err: DoraMeshError) -> None:
    await context.abort(err.status.grpc_code, err.message)


def unary_errors(
    fn: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Decorator for unary servicer methods: DoraMeshError -> its status; anything else -> INTERNAL.

    The service keeps serving whatever a single request does.
    """

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await fn(self, request, context)
        except DoraMeshError as err:
            _log.info("request refused", status=err.status.name, error=err.message)
            await context.abort(err.status.grpc_code, err.message)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as err:  # a bug must not take the server down
            _log.exception("unexpected error in servicer")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")
        raise AssertionError("unreachable")

    return wrapper


def stream_errors(
    fn: Callable[..., AsyncIterator[R]],
) -> Callable[..., AsyncIterator[R]]:
    """Decorator for streaming servicer methods (async generators), like ``unary_errors``."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[R]:
        try:
            async for item in fn(self, request, context):
                yield item
        except DoraMeshError as err:
            _log.info("stream refused", status=err.status.name, error=err.message)
            await context.abort(err.status.grpc_code, err.message)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as err:
            _log.exception("unexpected error in stream servicer")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")

    return wrapper
