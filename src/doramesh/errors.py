"""One error family for doramesh, and the one place where it maps to gRPC status codes.

Domain code raises ``DoraMeshError`` subclasses; servicers turn them into a status with
``abort_with`` (see ``doramesh.servicing``); the SDK turns a received status back into the same
subclass, so users never see a raw ``grpc.RpcError``.
"""

from __future__ import annotations

import enum

import grpc


class Status(enum.Enum):
    """The subset of gRPC status codes doramesh uses, by meaning."""

    INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
    NOT_FOUND = grpc.StatusCode.NOT_FOUND
    FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
    RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
    UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
    DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
    CANCELLED = grpc.StatusCode.CANCELLED
    ABORTED = grpc.StatusCode.ABORTED
    UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
    PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
    INTERNAL = grpc.StatusCode.INTERNAL
    UNKNOWN = grpc.StatusCode.UNKNOWN


class DoraMeshError(Exception):
    """Base of every error doramesh raises to its users."""

    status: Status = Status.UNKNOWN

    def __init__(self, message: str, *, status: Status | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"


class InvalidArgument(DoraMeshError):
    """Malformed input: bad tensor metadata, wrong shape, bad ids."""

    status = Status.INVALID_ARGUMENT


class NotFound(DoraMeshError):
    """An unknown model, stage, plan or agent."""

    status = Status.NOT_FOUND


class FailedPrecondition(DoraMeshError):
    """The request is well formed but cannot be met now: impossible QoE, no plan deployed."""

    status = Status.FAILED_PRECONDITION


class ResourceExhausted(DoraMeshError):
    """Too big or too many: an oversized message, a stage that does not fit in memory."""

    status = Status.RESOURCE_EXHAUSTED


class Unavailable(DoraMeshError):
    """A service or agent cannot be reached."""

    status = Status.UNAVAILABLE


class DeadlineExceeded(DoraMeshError):
    status = Status.DEADLINE_EXCEEDED


class Cancelled(DoraMeshError):
    status = Status.CANCELLED


class Aborted(DoraMeshError):
    """Refused because the state moved on: e.g. traffic for an old plan epoch."""

    status = Status.ABORTED


class Internal(DoraMeshError):
    status = Status.INTERNAL


_BY_STATUS: dict[Status, type[DoraMeshError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Aborted,
        Internal,
    )
}


def error_for(code: grpc.StatusCode, message: str) -> DoraMeshError:
    """The typed error for a received gRPC status."""
    try:
        status = Status(code)
    except ValueError:
        status = Status.UNKNOWN
    cls = _BY_STATUS.get(status, DoraMeshError)
    return cls(message, status=status)


def from_rpc_error(err: grpc.RpcError) -> DoraMeshError:
    """Convert a grpc.RpcError (sync or aio) into the typed error."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for(code, details or "")
