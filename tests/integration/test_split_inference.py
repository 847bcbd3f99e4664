"""A model split across agents gives the same outputs as the model run locally."""

from __future__ import annotations

import pytest
import torch

from doramesh import models
from doramesh.errors import FailedPrecondition, NotFound
from doramesh.sdk import AsyncClient
from doramesh.testing import LocalFleet
from doramesh.types import QoESpec

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: float32, same kernels on the same inputs: only BLAS reduction order can differ.
TOLERANCE = 1e-5


async def test_agents_found_by_mdns(fleet: LocalFleet) -> None:
    async with AsyncClient(fleet.address, timeout=10) as client:
        agents = await client.fleet()
    assert len(agents) == 3
    assert {a.discovered_by for a in agents} == {"mdns"}
    assert {a.profile.device_class for a in agents} == {
        "raspberry-pi-5",
        "jetson-orin-nano",
        "raspberry-pi-4",
    }
    assert all(a.state == "alive" for a in agents)


@pytest.mark.parametrize(("model", "min_stages"), [("mlp-tiny", 1), ("resnet18", 2)])
async def test_split_matches_local(fleet: LocalFleet, model: str, min_stages: int) -> None:
    """resnet18's compute dwarfs its activation transfers, so a throughput plan pipelines it;
    mlp-tiny is so small that the planner rightly keeps it on the fastest agent."""
    async with AsyncClient(fleet.address, timeout=120) as client:
        dep = await client.deploy(model, seed=7, qoe=QoESpec(objective="max_throughput"))
        assert len(dep.plan.stages) >= min_stages
        assert len({d.id for s in dep.plan.stages for d in s.devices}) >= min_stages
        reference = models.build_blocks(model, 7)
        shape = (3, 64, 64) if model == "resnet18" else None
        for i in range(3):
            x = models.example_input(model, 2, seed=i, sample_shape=shape)
            got = await client.infer(model, x)
            with torch.inference_mode():
                want = reference(x)
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= TOLERANCE


async def test_stream_keeps_request_order(fleet: LocalFleet) -> None:
    async with AsyncClient(fleet.address, timeout=120) as client:
        await client.deploy("mlp-tiny", seed=3)
        reference = models.build_blocks("mlp-tiny", 3)
        inputs = [models.example_input("mlp-tiny", 1, seed=i) for i in range(20)]
        results = [r async for r in client.infer_many("mlp-tiny", inputs)]
    assert [r.request_id for r in results] == [str(i) for i in range(20)]
    with torch.inference_mode():
        for x, r in zip(inputs, results, strict=True):
            assert torch.allclose(r.output, reference(x), atol=TOLERANCE, rtol=0)


async def test_unknown_model_is_not_found(fleet: LocalFleet) -> None:
    async with AsyncClient(fleet.address, timeout=10) as client:
        with pytest.raises(NotFound, match="no-such-model"):
            await client.deploy("no-such-model")
        with pytest.raises(NotFound):
            await client.infer("no-such-model", torch.zeros(1, 4))
        # still serving
        assert len(await client.fleet()) == 3


async def test_infer_before_deploy_is_a_failed_precondition(fleet: LocalFleet) -> None:
    async with AsyncClient(fleet.address, timeout=10) as client:
        with pytest.raises(FailedPrecondition, match="Deploy"):
            await client.infer("resnet50", torch.zeros(1, 3, 32, 32))


async def test_data_parallel_stage_matches_local(fleet: LocalFleet) -> None:
    """A pipeline whose middle stage has two replicas with uneven shares: each microbatch is
    split along the batch, run on both, gathered in order."""
    from doramesh.types import DeviceShare, Plan, PlanId, Prediction, StagePlan

    async with AsyncClient(fleet.address, timeout=120) as client:
        ids = sorted(a.profile.node_id for a in await client.fleet())
        plan = Plan(
            plan_id=PlanId("hand-made"),
            stages=(
                StagePlan(0, 2, (DeviceShare(ids[0], 1.0),)),
                StagePlan(3, 6, (DeviceShare(ids[1], 0.75), DeviceShare(ids[2], 0.25))),
                StagePlan(7, 9, (DeviceShare(ids[0], 1.0),)),
            ),
            microbatch=5,
            flows=(),
            predicted=Prediction(0.0, 0.0, 0.0),
        )
        dep = await client.deploy("resnet18", seed=5, plan=plan)
        assert [len(s.devices) for s in dep.plan.stages] == [1, 2, 1]
        reference = models.build_blocks("resnet18", 5)
        x = models.example_input("resnet18", 5, seed=1, sample_shape=(3, 64, 64))
        got = await client.infer("resnet18", x)
        with torch.inference_mode():
            want = reference(x)
        assert (got - want).abs().max().item() <= TOLERANCE
        status = await client.job_status("resnet18")
        assert status.deployment.plan_epoch == dep.plan_epoch


async def test_a_plan_that_does_not_cover_the_model_is_refused(fleet: LocalFleet) -> None:
    from doramesh.errors import InvalidArgument
    from doramesh.types import DeviceShare, Plan, PlanId, Prediction, StagePlan

    async with AsyncClient(fleet.address, timeout=30) as client:
        ids = [a.profile.node_id for a in await client.fleet()]
        gap = Plan(
            PlanId("gap"),
            (StagePlan(0, 2, (DeviceShare(ids[0]),)), StagePlan(4, 9, (DeviceShare(ids[1]),))),
            1,
            (),
            Prediction(0.0, 0.0, 0.0),
        )
        with pytest.raises(InvalidArgument, match="continue"):
            await client.deploy("resnet18", plan=gap)
