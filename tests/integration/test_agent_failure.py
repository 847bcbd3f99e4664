"""An agent killed in the middle of a stream of 200 requests costs no request: all 200 answers
arrive, each exactly once, each equal to the local result."""

from __future__ import annotations

import asyncio

import pytest
import torch

from doramesh import models
from doramesh.sdk import AsyncClient
from doramesh.testing import LocalFleet
from doramesh.types import QoESpec

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

TOLERANCE = 1e-5
REQUESTS = 200
SHAPE = (3, 32, 32)


async def test_kill_an_agent_mid_stream_loses_nothing() -> None:
    classes = ("raspberry-pi-5", "jetson-orin-nano", "raspberry-pi-4", "mini-pc")
    async with LocalFleet(classes=classes) as fleet:
        async with AsyncClient(fleet.address, timeout=300) as client:
            dep = await client.deploy("resnet18", seed=2, qoe=QoESpec(objective="max_throughput"))
            used = {d.id for s in dep.plan.stages for d in s.devices}
            assert len(used) >= 2
            victim = next(i for i, a in enumerate(fleet.agents) if a.settings.node_id in used)
            reference = models.build_blocks("resnet18", 2)
            inputs = [
                models.example_input("resnet18", 1, seed=i, sample_shape=SHAPE)
                for i in range(REQUESTS)
            ]
            results = []
            killed = False
            async for result in client.infer_many("resnet18", inputs):
                results.append(result)
                if len(results) == 40 and not killed:
                    killed = True
                    asyncio.get_running_loop().create_task(fleet.kill_agent(victim))
            status = await client.job_status("resnet18")
    assert killed
    assert [r.request_id for r in results] == [str(i) for i in range(REQUESTS)]
    with torch.inference_mode():
        for x, r in zip(inputs, results, strict=True):
            assert (r.output - reference(x)).abs().max().item() <= TOLERANCE
    epochs = {r.plan_epoch for r in results}
    assert len(epochs) >= 2, "the tail of the stream ran on a new plan"
    assert fleet.agents[victim].settings.node_id not in {
        d.id for s in status.deployment.plan.stages for d in s.devices
    }
