from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from doramesh.testing import LocalFleet


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fleet() -> AsyncIterator[LocalFleet]:
    """Three agents emulating different devices, found by real mDNS on loopback."""
    async with LocalFleet(
        classes=("raspberry-pi-5", "jetson-orin-nano", "raspberry-pi-4"), memory_limit_mb=2048
    ) as f:
        yield f
