"""Load shedding: beyond its in-flight limit a service refuses a request at once with
RESOURCE_EXHAUSTED (the SDK's ``ResourceExhausted``), answers what it took correctly, and keeps
serving.

The accepted requests are held at a gate (the coordinator's dispatch, an agent's compute) until
the excess has been refused, so the burst overlaps by construction rather than by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch

from doramesh import models
from doramesh.errors import ResourceExhausted
from doramesh.sdk import AsyncClient
from doramesh.testing import LocalFleet, wait_for_async

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOLERANCE = 1e-5
LIMIT = 3
EXCESS = 4
MODEL = "mlp-tiny"
SEED = 5


@contextlib.asynccontextmanager
async def _fleet(**limits: int) -> AsyncIterator[LocalFleet]:
    """Two agents (static list, no mDNS: quicker) with ``MODEL`` deployed."""
    async with LocalFleet(classes=(None, None), mdns=False, measure_s=0.1, **limits) as f:
        async with AsyncClient(f.address, timeout=60) as client:
            await client.deploy(MODEL, seed=SEED)
        yield f


class Gate:
    """Wraps an async callable: calls wait at the gate (counted) until it opens."""

    def __init__(self) -> None:
        self.entered = 0
        self.open = asyncio.Event()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered += 1
            await self.open.wait()
            return await fn(*args, **kwargs)

        return gated


async def _burst(fleet: LocalFleet, gate: Gate) -> None:
    """LIMIT + EXCESS requests at once: EXCESS refused while LIMIT wait at the gate, then the
    LIMIT answered equal to the model run locally, then one more served."""
    reference = models.build_blocks(MODEL, SEED)
    inputs = [models.example_input(MODEL, 1, seed=i) for i in range(LIMIT + EXCESS)]
    async with AsyncClient(fleet.address, timeout=60) as client:
        calls = [asyncio.create_task(client.infer(MODEL, x)) for x in inputs]
        await wait_for_async(lambda: sum(c.done() for c in calls) >= EXCESS, timeout=20)
        await wait_for_async(lambda: gate.entered >= LIMIT, timeout=20)
        done = [c for c in calls if c.done()]
        assert len(done) == EXCESS and gate.entered == LIMIT
        for call in done:
            with pytest.raises(ResourceExhausted):
                call.result()
        gate.open.set()
        served = 0
        with torch.inference_mode():
            for x, call in zip(inputs, calls, strict=True):
                if call in done:
                    continue
                got = await call
                assert (got - reference(x)).abs().max().item() <= TOLERANCE
                served += 1
            assert served == LIMIT
            x = models.example_input(MODEL, 1, seed=99)
            got = await client.infer(MODEL, x)
            assert (got - reference(x)).abs().max().item() <= TOLERANCE


async def test_coordinator_sheds_requests_beyond_its_limit() -> None:
    async with _fleet(max_inflight_requests=LIMIT) as fleet:
        assert fleet.coordinator is not None
        deployer = fleet.coordinator.deployer
        gate = Gate()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(deployer, "infer", gate.wrap(deployer.infer))
            await _burst(fleet, gate)


async def test_agent_sheds_microbatches_beyond_its_limit() -> None:
    """The coordinator takes the whole burst; the first stage's agent, limited to LIMIT
    microbatches, answers the rest RESOURCE_EXHAUSTED, which reaches the caller as is."""
    async with _fleet(max_inflight_microbatches=LIMIT) as fleet:
        gate = Gate()
        with pytest.MonkeyPatch.context() as patch:
            for agent in fleet.agents:
                assert agent.runtime is not None
                patch.setattr(agent.runtime, "compute", gate.wrap(agent.runtime.compute))
            await _burst(fleet, gate)
