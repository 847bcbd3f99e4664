"""Fleet tests: a real multi-host LAN in network namespaces (see doramesh.testing.testbed).

They need root, iproute2 (ip, tc) and iptables; on a machine without them every test here is
skipped with the reason, never passed silently. One testbed is shared by the module's tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from doramesh.testing.netns import why_unavailable
from doramesh.testing.testbed import HostSpec, Testbed

_REASON = why_unavailable(need_iptables=True)

#: Three hosts on one shared medium: a Pi 5, a Jetson Orin Nano and a Pi 4.
HOSTS = (
    HostSpec("pi5", "raspberry-pi-5"),
    HostSpec("orin", "jetson-orin-nano"),
    HostSpec("pi4", "raspberry-pi-4"),
)
MEDIUM_MBPS = 200.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fleet/" in str(item.fspath):
            item.add_marker(pytest.mark.fleet)
            if _REASON is not None:
                item.add_marker(pytest.mark.skip(reason=f"fleet testbed unavailable: {_REASON}"))


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    if _REASON is not None:
        pytest.skip(f"fleet testbed unavailable: {_REASON}")
    with Testbed(HOSTS, shared_mbps=MEDIUM_MBPS, planner_network_mbps=MEDIUM_MBPS) as tb:
        yield tb
