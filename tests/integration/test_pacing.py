"""Fleet-wide pacing: plans of two models live at once are paced together, and SetPacing
switches every sender's token bucket off and on again, live.

Real parts: in-process agents and coordinator on loopback, the real network scheduler; the
buckets checked are the agents' own (what their sends wait on).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from doramesh import models
from doramesh.planner import milp
from doramesh.sdk import AsyncClient
from doramesh.testing import LocalFleet
from doramesh.testing.fleet import wait_for_async
from doramesh.tokenbucket import TokenBucket
from doramesh.types import (
    DeviceProfile,
    DeviceShare,
    Network,
    NodeId,
    Plan,
    QoESpec,
    StagePlan,
    Workload,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

#: The medium the coordinator plans for: a 40 Mbit/s Wi-Fi.
NETWORK = Network("shared", 40.0, 1.0)
CAMERA, BULK = "resnet18", "resnet50"
CAMERA_LOAD = Workload("inference", 1, rate_rps=2.0)
BULK_LOAD = Workload("inference", 1, rate_rps=0.0)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fleet() -> AsyncIterator[LocalFleet]:
    async with LocalFleet(classes=("raspberry-pi-5", "mini-pc", "raspberry-pi-5"), mdns=False) as f:
        assert f.coordinator is not None and f.coordinator.deployer is not None
        f.coordinator.deployer.network = NETWORK
        yield f


def two_stages(
    model: str, cut: int, a: str, b: str, devices: list[DeviceProfile], load: Workload
) -> Plan:
    last = models.get_spec(model).num_blocks - 1
    stages = (
        StagePlan(0, cut, (DeviceShare(NodeId(a), 1.0),)),
        StagePlan(cut + 1, last, (DeviceShare(NodeId(b), 1.0),)),
    )
    return milp.make_plan(stages, devices, models.layer_table(model), NETWORK, load)


def sender_bucket(fleet: LocalFleet, node_id: str, model: str) -> TokenBucket | None:
    (agent,) = [a for a in fleet.agents if a.settings.node_id == node_id]
    assert agent.runtime is not None
    (stage,) = [s for s in agent.runtime.stages.values() if s.spec.model == model]
    (hop,) = stage.next
    return hop.link.bucket


def mbps(bucket: TokenBucket | None) -> float:
    return 0.0 if bucket is None or bucket.rate is None else bucket.rate * 8 / 1e6


async def test_two_models_are_paced_together_and_pacing_switches_live(fleet: LocalFleet) -> None:
    cam, hub, nas = (a.settings.node_id for a in fleet.agents)
    async with AsyncClient(fleet.address, timeout=120) as client:
        devices = [a.profile for a in await client.fleet()]
        camera = two_stages(CAMERA, 6, cam, hub, devices, CAMERA_LOAD)
        bulk = two_stages(BULK, 1, nas, hub, devices, BULK_LOAD)
        await client.deploy(
            CAMERA, plan=camera, qoe=QoESpec(latency_ms=400.0), workload=CAMERA_LOAD
        )
        alone = mbps(sender_bucket(fleet, cam, CAMERA))
        await client.deploy(
            BULK, plan=bulk, qoe=QoESpec(objective="max_throughput"), workload=BULK_LOAD
        )
        camera_flow = (await client.job_status(CAMERA)).deployment.plan.flows[0]
        bulk_flow = (await client.job_status(BULK)).deployment.plan.flows[0]
        # Alone, the camera's plan kept the buckets it was given (none: make_plan leaves the
        # rates to the scheduler); beside the bulk job, the joint schedule gives the camera its
        # floor and SLO first and caps the bulk job to what is left.
        assert alone == 0.0
        assert bulk_flow.rate_mbps + camera_flow.rate_mbps <= 40.0 * (1 + 1e-6)
        assert bulk_flow.rate_mbps < 40.0 - 1.0
        assert camera_flow.burst_kb >= models.layer_table(CAMERA).layers[6].activation_bytes / 1e3
        assert mbps(sender_bucket(fleet, nas, BULK)) == pytest.approx(bulk_flow.rate_mbps)
        assert mbps(sender_bucket(fleet, cam, CAMERA)) == pytest.approx(camera_flow.rate_mbps)

        assert await client.set_pacing(False) == 2
        for node_id, model in ((cam, CAMERA), (nas, BULK)):
            bucket = sender_bucket(fleet, node_id, model)
            assert bucket is None or bucket.unlimited
        x = models.example_input(CAMERA, 1, seed=3)
        await client.infer(CAMERA, x)  # unpaced flows still serve

        assert await client.set_pacing(True) == 2
        assert mbps(sender_bucket(fleet, nas, BULK)) == pytest.approx(bulk_flow.rate_mbps)
        assert mbps(sender_bucket(fleet, cam, CAMERA)) == pytest.approx(camera_flow.rate_mbps)
        assert await client.set_pacing(True) == 0  # nothing left to change


async def test_a_given_plan_that_misses_its_slo_is_not_replanned(fleet: LocalFleet) -> None:
    """A client that pinned its plan keeps it when the QoE is missed (re-weighting only): the
    contention bench's unpaced phase misses the SLO on purpose and must measure that plan."""
    cam, hub, _ = (a.settings.node_id for a in fleet.agents)
    coordinator = fleet.coordinator
    assert coordinator is not None and coordinator.deployer is not None
    deployer = coordinator.deployer
    async with AsyncClient(fleet.address, timeout=120) as client:
        devices = [a.profile for a in await client.fleet()]
        plan = two_stages(CAMERA, 6, cam, hub, devices, CAMERA_LOAD)
        dep = await client.deploy(
            CAMERA, plan=plan, qoe=QoESpec(latency_ms=1.0), workload=CAMERA_LOAD
        )
        x = models.example_input(CAMERA, 1, seed=4)
        for _ in range(3):
            await client.infer(CAMERA, x)
        live = deployer.live[CAMERA]
        # The adapter has seen the missed latency (the round that would ask for a re-plan).
        await wait_for_async(
            lambda: any(lat is not None and lat > 1.0 for _, lat in live.solved_latencies), 30
        )
        assert live.qoe_replan_at == -math.inf  # no re-plan was asked for
        assert CAMERA not in deployer._replanning and CAMERA not in deployer._replan_errors
        assert live.replans == 0 and deployer.live[CAMERA] is live
        status = await client.job_status(CAMERA)
        assert status.deployment.plan_epoch == dep.plan_epoch
