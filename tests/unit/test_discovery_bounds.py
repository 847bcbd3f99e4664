"""The coordinator's registry and the mDNS browser's backlog are bounded (issue 6: an mDNS flood
cannot grow them), with the dead forgotten first."""

from __future__ import annotations

import asyncio

import pytest
from zeroconf import ServiceStateChange

from doramesh import SERVICE_TYPE
from doramesh.coordinator.registry import FleetRegistry
from doramesh.discovery import Browser, instance_name
from doramesh.errors import ResourceExhausted
from doramesh.types import DeviceProfile, NodeId


def _profile(node_id: str) -> DeviceProfile:
    return DeviceProfile(NodeId(node_id), "pi", 1.0, 1 << 30, address=f"{node_id}:7072")


def test_registry_refuses_past_its_cap_and_forgets_the_dead_first() -> None:
    registry = FleetRegistry(max_agents=3, dead_after_s=1.0)
    for i in range(3):
        registry.admit(_profile(f"a{i}"), "mdns", now=0.0)
    registry.admit(_profile("a1"), "mdns", now=0.5)  # the same node again takes no new room
    with pytest.raises(ResourceExhausted):
        registry.admit(_profile("a3"), "mdns", now=1.0)
    registry.mark_dead(NodeId("a0"), now=1.0)
    registry.admit(_profile("a3"), "mdns", now=1.0)
    assert sorted(registry.agents) == ["a1", "a2", "a3"]


async def test_browser_backlog_is_bounded() -> None:
    async def found(_: object) -> None:
        return None

    browser = Browser(found, max_entries=4)
    started = 0
    release = asyncio.Event()

    async def slow_resolve(name: str) -> None:
        nonlocal started
        started += 1
        await release.wait()

    browser._resolve = slow_resolve  # type: ignore[method-assign]
    for i in range(100):
        browser._on_change(
            None, SERVICE_TYPE, f"flood-{i}.{SERVICE_TYPE}", ServiceStateChange.Added
        )  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert len(browser._tasks) == 4 and started == 4
    release.set()
    await asyncio.sleep(0.01)
    assert not browser._tasks


def test_instance_names_are_fleet_qualified_and_short() -> None:
    assert instance_name("pi-1", "home") == "pi-1 @home"
    assert instance_name("pi-1") == "pi-1"
    long = instance_name("n" * 128, "f" * 40)
    assert len(long.encode()) <= 63
    assert long != instance_name("n" * 127 + "m", "f" * 40)
