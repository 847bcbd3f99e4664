"""One error family for doramesh, and the one place where it maps to gRPC status codes.

Domain code raises ``DoraMeshError`` subclasses; servicers turn them into a status with
``abort_with`` (see ``doramesh.servicing``); the SDK turns a received status back into the same
subclass, so users never see a raw ``grpc.RpcError``.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc


class Status(enum.Enum):
    """The gRPC status codes doramesh uses, by meaning; values are the wire numbers.

    Pure modules (planner, catalogue) raise these errors too, so this module must not import
    grpc at load time.
    """

    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16

    @property
    def grpc_code(self) -> grpc.StatusCode:
        import grpc

        return getattr(grpc.StatusCode, self.name)

    @classmethod
    def from_grpc(cls, code: Any) -> Status:
        """From a grpc.StatusCode or its wire number; UNKNOWN for anything else."""
        number = code.value[0] if hasattr(code, "value") else code
        try:
            return cls(number)
        except ValueError:
            return cls.UNKNOWN


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


class Unauthenticated(DoraMeshError):
    """No valid credential: a missing, expired, forged or already redeemed token."""

    status = Status.UNAUTHENTICATED


class PermissionDenied(DoraMeshError):
    """A valid identity whose role may not make this call."""

    status = Status.PERMISSION_DENIED


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
        Unauthenticated,
        PermissionDenied,
    )
}


def error_for(code: grpc.StatusCode | int, message: str) -> DoraMeshError:
    """The typed error for a received gRPC status (a StatusCode or its wire number)."""
    status = Status.from_grpc(code)
    cls = _BY_STATUS.get(status, DoraMeshError)
    return cls(message, status=status)


def from_rpc_error(err: grpc.RpcError) -> DoraMeshError:
    """Convert a grpc.RpcError (sync or aio) into the typed error."""
    code: Any = err.code() if hasattr(err, "code") else Status.UNKNOWN.value
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for(code, details or "")
