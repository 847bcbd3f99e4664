"""A plan's power modes reach the agents: LoadStage switches the device, or refuses.

Agents emulating catalogue devices advertise their class's modes and apply them by pacing; the
coordinator passes each device's ``DeviceShare.mode`` in ``LoadStageRequest.power_mode``. A
device serving stages of several plans runs the fastest mode any of them asks for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio
import torch

from doramesh import models
from doramesh.agent.server import AgentServer
from doramesh.errors import FailedPrecondition, InvalidArgument
from doramesh.planner import milp
from doramesh.sdk import AsyncClient
from doramesh.testing import LocalFleet
from doramesh.types import DeviceProfile, DeviceShare, Network, NodeId, Plan, StagePlan, Workload

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "mlp-tiny"
NETWORK = Network("shared", 100.0, 1.0)
LOAD = Workload("inference", 1, rate_rps=1.0)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fleet() -> AsyncIterator[LocalFleet]:
    async with LocalFleet(classes=("raspberry-pi-5", "jetson-orin-nano"), mdns=False) as f:
        yield f


def split(devices: list[DeviceProfile], a: DeviceShare, b: DeviceShare) -> Plan:
    last = models.get_spec(MODEL).num_blocks - 1
    stages = (StagePlan(0, 0, (a,)), StagePlan(1, last, (b,)))
    return milp.make_plan(stages, devices, models.layer_table(MODEL), NETWORK, LOAD)


def agent(fleet: LocalFleet, node_id: str) -> AgentServer:
    (found,) = [a for a in fleet.agents if a.settings.node_id == node_id]
    return found


def speed(fleet: LocalFleet, node_id: str) -> float:
    runtime = agent(fleet, node_id).runtime
    assert runtime is not None
    return runtime.pacer.speed_factor


async def test_plan_modes_are_applied_and_released(fleet: LocalFleet) -> None:
    pi, orin = (a.settings.node_id for a in fleet.agents)
    x = models.example_input(MODEL, 1)
    with torch.inference_mode():
        want = models.build_blocks(MODEL, 0)(x)
    async with AsyncClient(fleet.address, timeout=120) as client:
        devices = [a.profile for a in await client.fleet()]
        advertised = {d.node_id: [m.name for m in d.power_modes] for d in devices}
        assert advertised[NodeId(pi)] == ["2.4GHz", "1.5GHz"]
        assert advertised[NodeId(orin)] == ["15W", "7W"]

        low = split(
            devices, DeviceShare(NodeId(pi), 1.0, "1.5GHz"), DeviceShare(NodeId(orin), 1.0, "7W")
        )
        await client.deploy(MODEL, plan=low)
        assert speed(fleet, pi) == pytest.approx(1.5 / 2.4)
        assert speed(fleet, orin) == pytest.approx(408 / 625)
        got = await client.infer(MODEL, x)
        assert (got - want).abs().max().item() <= 1e-5

        # A new epoch in the top mode: its stages load at full speed, and once the old epoch's
        # stages are unloaded nothing asks for the low modes any more.
        top = split(devices, DeviceShare(NodeId(pi), 1.0), DeviceShare(NodeId(orin), 1.0))
        await client.deploy(MODEL, plan=top)
        assert speed(fleet, pi) == 1.0
        assert speed(fleet, orin) == 1.0
        assert (await client.infer(MODEL, x) - want).abs().max().item() <= 1e-5


async def test_a_mode_the_agent_does_not_have_fails_the_deploy(fleet: LocalFleet) -> None:
    pi, orin = (a.settings.node_id for a in fleet.agents)
    async with AsyncClient(fleet.address, timeout=120) as client:
        devices = [a.profile for a in await client.fleet()]
        top = split(devices, DeviceShare(NodeId(pi), 1.0), DeviceShare(NodeId(orin), 1.0))
        await client.deploy(MODEL, plan=top)
        low = split(devices, DeviceShare(NodeId(pi), 1.0, "1.5GHz"), DeviceShare(NodeId(orin), 1.0))
        first, rest = low.stages
        bogus = replace(
            low, stages=(replace(first, devices=(DeviceShare(NodeId(pi), 1.0, "9GHz"),)), rest)
        )
        with pytest.raises((FailedPrecondition, InvalidArgument), match="9GHz"):
            await client.deploy(MODEL, plan=bogus)
        assert speed(fleet, pi) == 1.0
        # The deployment that was serving still serves.
        out = await client.infer(MODEL, models.example_input(MODEL, 1))
        assert out.shape[0] == 1
