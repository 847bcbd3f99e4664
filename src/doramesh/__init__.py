"""doramesh: QoE-aware hybrid parallelism across a fleet of small edge devices."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
PROTOCOL_VERSION = "1"
SERVICE_TYPE = "_doramesh._tcp.local."

__all__ = ["PROTOCOL_VERSION", "SERVICE_TYPE", "AsyncClient", "Client", "DoraMeshError"]

if TYPE_CHECKING:
    from doramesh.sdk import AsyncClient, Client, DoraMeshError


def __getattr__(name: str) -> Any:
    # The SDK pulls in grpc; keep `import doramesh` light for the planner's pure modules.
    if name in {"Client", "AsyncClient", "DoraMeshError"}:
        from doramesh import sdk

        return getattr(sdk, name)
    raise AttributeError(name)
