"""mDNS discovery with python-zeroconf: agents announce ``_doramesh._tcp.local.``, the
coordinator browses.

An announcement is a hint, never proof of identity: the coordinator admits an agent only over a
gRPC connection whose TLS handshake proved the agent holds a fleet certificate for the node id it
announced (see ``coordinator.server``). The browser's table and its backlog of records to
resolve are bounded (``max_entries``) so an mDNS flood cannot grow memory without limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from doramesh import PROTOCOL_VERSION, SERVICE_TYPE

_log = structlog.get_logger("discovery")


@dataclass(frozen=True, slots=True)
class Announcement:
    """What one mDNS record says about an agent."""

    name: str
    node_id: str
    address: str  # host:port of its gRPC server
    fleet_id: str
    protocol_version: str


def lan_address(interfaces: Sequence[str] | None = None) -> str:
    """The IPv4 address peers should dial when a daemon listens on a wildcard address.

    Takes the first of ``interfaces`` if given, else the first non-loopback IPv4 address of this
    host (from the interface list; nothing is sent), else 127.0.0.1.
    """
    if interfaces:
        return interfaces[0]
    import ifaddr

    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                return ip.ip
    return "127.0.0.1"


def instance_name(node_id: str, fleet_id: str = "") -> str:
    """The mDNS instance label: the node id, qualified by the fleet so two fleets on one LAN
    (or two test fleets on one loopback) never collide on a name; at most 63 bytes."""
    label = f"{node_id} @{fleet_id}" if fleet_id else node_id
    if len(label.encode()) > 63:
        digest = hashlib.sha256(label.encode()).hexdigest()[:12]
        label = f"{label.encode()[:50].decode(errors='ignore')}-{digest}"
    return label


def _zeroconf(interfaces: Sequence[str] | None) -> AsyncZeroconf:
    if interfaces:
        return AsyncZeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only)
    return AsyncZeroconf(ip_version=IPVersion.V4Only)


class Announcer:
    """Registers this agent's service record for as long as it runs."""

    def __init__(
        self,
        *,
        node_id: str,
        host: str,
        port: int,
        fleet_id: str = "",
        interfaces: Sequence[str] | None = None,
    ) -> None:
        self._interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self.info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance_name(node_id, fleet_id)}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(host)],
            port=port,
            properties={
                "node_id": node_id,
                "grpc_port": str(port),
                "proto": PROTOCOL_VERSION,
                "fleet_id": fleet_id,
            },
            server=f"{node_id}.local.",
        )

    async def start(self) -> None:
        self._zc = _zeroconf(self._interfaces)
        await self._zc.async_register_service(self.info, allow_name_change=False)
        _log.info("announced", name=self.info.name, port=self.info.port)

    async def stop(self) -> None:
        if self._zc is None:
            return
        try:
            await self._zc.async_unregister_service(self.info)
        finally:
            await self._zc.async_close()
            self._zc = None


FoundCallback = Callable[[Announcement], Awaitable[None]]
LostCallback = Callable[[str], Awaitable[None]]


class Browser:
    """Browses for agents; calls ``on_found`` for each new or updated record.

    ``on_lost`` gets the node id when a goodbye arrives; a killed agent sends none, which is why
    liveness comes from health checks, not from here.
    """

    def __init__(
        self,
        on_found: FoundCallback,
        on_lost: LostCallback | None = None,
        *,
        interfaces: Sequence[str] | None = None,
        fleet_id: str = "",
        max_entries: int = 1024,
        resolve_timeout_ms: int = 3000,
    ) -> None:
        self._on_found = on_found
        self._on_lost = on_lost
        self._interfaces = interfaces
        self._fleet_id = fleet_id
        self._max_entries = max_entries
        self._resolve_timeout_ms = resolve_timeout_ms
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: name -> node id, bounded: oldest entries are forgotten first.
        self.seen: OrderedDict[str, str] = OrderedDict()

    async def start(self) -> None:
        self._zc = _zeroconf(self._interfaces)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
        )

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if len(self._tasks) >= self._max_entries:
            _log.warning("discovery backlog full; dropping record", name=name)
            return
        if state_change is ServiceStateChange.Removed:
            coro: Awaitable[None] = self._lost(name)
        else:
            coro = self._resolve(name)
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lost(self, name: str) -> None:
        node_id = self.seen.pop(name, None)
        if node_id is not None and self._on_lost is not None:
            await self._on_lost(node_id)

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, self._resolve_timeout_ms):
            _log.debug("could not resolve", name=name)
            return
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or info.port is None:
            return
        fleet_id = props.get("fleet_id", "")
        if self._fleet_id and fleet_id != self._fleet_id:
            return
        announcement = Announcement(
            name=name,
            node_id=props.get("node_id", "")[:128],
            address=f"{addresses[0]}:{info.port}",
            fleet_id=fleet_id,
            protocol_version=props.get("proto", ""),
        )
        if not announcement.node_id:
            return
        self.seen[name] = announcement.node_id
        self.seen.move_to_end(name)
        while len(self.seen) > self._max_entries:
            self.seen.popitem(last=False)
        await self._on_found(announcement)

    async def stop(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        for task in list(self._tasks):
            task.cancel()
        if self._zc is not None:
            await self._zc.async_close()
            self._zc = None
