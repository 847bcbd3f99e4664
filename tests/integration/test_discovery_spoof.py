"""Issue 6, done-when 2: an mDNS announcement is only a hint.

A record with an enrolled agent's service name and node id but another address (a rogue device
with a certificate for another node id, or one from another CA claiming that node id) never gets
past the coordinator's pinned handshake, so it is never admitted and never scheduled. A flood of
records leaves the discovery table, the admission channels and the registry bounded.
Real zeroconf on 127.0.0.1, real servers, a secure LocalFleet.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from doramesh import PROTOCOL_VERSION, SERVICE_TYPE, models
from doramesh.agent.config import AgentSettings
from doramesh.agent.server import AgentServer
from doramesh.coordinator import server as coordinator_server
from doramesh.discovery import Announcement, instance_name
from doramesh.sdk import AsyncClient
from doramesh.security.ca import FleetCA
from doramesh.security.credentials import Credentials
from doramesh.security.identity import Identity
from doramesh.testing import LocalFleet, wait_for_async

pytestmark = pytest.mark.slow


def _record(name: str, node_id: str, port: int, fleet_id: str) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{instance_name(name, fleet_id)}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton("127.0.0.1")],
        port=port,
        properties={
            "node_id": node_id,
            "grpc_port": str(port),
            "proto": PROTOCOL_VERSION,
            "fleet_id": fleet_id,
        },
        server=f"{name}-{port}.local.",
    )


async def _announce(records: list[AsyncServiceInfo]) -> AsyncZeroconf:
    """Announce without probing for conflicts, as a spoofer would (another responder already
    owns these names)."""
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    for info in records:
        await zc.async_register_service(info, cooperating_responders=True)
    return zc


def _record_found(fleet: LocalFleet) -> list[Announcement]:
    """Every announcement the coordinator has finished handling, in order."""
    assert fleet.coordinator is not None and fleet.coordinator._browser is not None
    browser = fleet.coordinator._browser
    handled: list[Announcement] = []
    original: Callable[[Announcement], Awaitable[None]] = browser._on_found

    async def on_found(ann: Announcement) -> None:
        await original(ann)
        handled.append(ann)

    browser._on_found = on_found  # type: ignore[method-assign]
    return handled


async def test_spoofed_announcement_is_never_admitted_or_scheduled() -> None:
    async with LocalFleet(classes=("raspberry-pi-5", "jetson-orin-nano")) as fleet:
        coordinator = fleet.coordinator
        assert coordinator is not None
        victim = fleet.agents[0]
        victim_id = victim.settings.node_id
        handled = _record_found(fleet)
        # Every address the registry ever holds, sampled while the spoof is handled (the
        # registry is a slotted dataclass: watched, not patched).
        admitted: set[str] = set()
        watching = asyncio.Event()

        async def watch() -> None:
            while not watching.is_set():
                admitted.update(r.profile.address for r in coordinator.registry.agents.values())
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())

        # Rogue 1: a device enrolled in this fleet under another node id.
        insider = AgentServer(
            AgentSettings(
                listen="127.0.0.1:0",
                node_id="rogue-1",
                fleet_id=fleet.fleet_id,
                announce=False,
                cache_dir=fleet.cache_dir / "rogue-1",  # type: ignore[operator]
                measure_s=0.1,
            ),
            credentials=fleet.issue("agent", "rogue-1"),
        )
        # Rogue 2: a certificate for the victim's own node id, from another CA.
        stranger_ca = FleetCA.create(fleet.fleet_id)
        stranger = Credentials.issued_by(stranger_ca, Identity(fleet.fleet_id, "agent", victim_id))
        outsider = AgentServer(
            AgentSettings(
                listen="127.0.0.1:0",
                node_id=victim_id,
                fleet_id=fleet.fleet_id,
                announce=False,
                cache_dir=fleet.cache_dir / "rogue-2",  # type: ignore[operator]
                measure_s=0.1,
            ),
            credentials=stranger,
        )
        rogues = [insider, outsider]
        for rogue in rogues:
            await rogue.start()
        rogue_addresses = {r.address for r in rogues}
        # The same service name and node id as the victim, at the rogues' addresses.
        zcs = [
            await _announce(
                [_record(victim_id, victim_id, int(r.address.rpartition(":")[2]), fleet.fleet_id)]
            )
            for r in rogues
        ]
        try:
            await wait_for_async(
                lambda: rogue_addresses <= {a.address for a in handled}, timeout=20
            )
            watching.set()
            await watcher
            assert not rogue_addresses & admitted
            assert coordinator.registry.address(victim_id) == victim.address  # type: ignore[arg-type]
            assert {p.address for p in coordinator.registry.alive()} == {
                a.address for a in fleet.agents
            }
            async with AsyncClient(fleet.address, timeout=60) as client:
                dep = await client.deploy("mlp-tiny", seed=3)
                placed = {d.id for s in dep.plan.stages for d in s.devices}
                x = models.example_input("mlp-tiny", 2, seed=1)
                await client.infer("mlp-tiny", x)
            assert placed <= {a.settings.node_id for a in fleet.agents}
            for rogue in rogues:
                assert rogue.runtime is not None
                assert rogue.runtime.stages == {} and rogue.runtime.computations == 0
        finally:
            for zc in zcs:
                await zc.async_unregister_all_services()
                await zc.async_close()
            for rogue in rogues:
                await rogue.stop(0)


async def test_mdns_flood_leaves_discovery_and_registry_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap_channels, cap_seen, flood = 8, 16, 120
    monkeypatch.setattr(coordinator_server, "MAX_ADMISSION_CHANNELS", cap_channels)
    async with LocalFleet(classes=("raspberry-pi-5",)) as fleet:
        coordinator = fleet.coordinator
        assert coordinator is not None and coordinator._browser is not None
        browser = coordinator._browser
        browser._max_entries = cap_seen
        handled = _record_found(fleet)
        # Nothing listens on these ports: every admission attempt fails fast.
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        peaks = {"seen": 0, "tasks": 0, "channels": 0, "agents": 0}
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                peaks["seen"] = max(peaks["seen"], len(browser.seen))
                peaks["tasks"] = max(peaks["tasks"], len(browser._tasks))
                peaks["channels"] = max(peaks["channels"], len(coordinator._channels))
                peaks["agents"] = max(peaks["agents"], len(coordinator.registry.agents))
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        records = [_record(f"flood-{i}", f"flood-{i}", port, fleet.fleet_id) for i in range(flood)]
        zc = await _announce(records)
        try:
            # Some records are dropped by the bounded backlog; wait until a good share of the
            # rest has been handled and the flood has settled.
            await wait_for_async(lambda: len(handled) >= cap_seen, timeout=30)
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await sampler
            await zc.async_unregister_all_services()
            await zc.async_close()
        assert peaks["seen"] <= cap_seen
        assert peaks["tasks"] <= cap_seen
        assert peaks["channels"] <= cap_channels + len(fleet.agents)
        assert peaks["agents"] == len(fleet.agents)
        assert [p.node_id for p in coordinator.registry.alive()] == [
            fleet.agents[0].settings.node_id
        ]
        # The fleet still serves.
        async with AsyncClient(fleet.address, timeout=60) as client:
            await client.deploy("mlp-tiny", seed=3)
            await client.infer("mlp-tiny", models.example_input("mlp-tiny", 1, seed=2))
