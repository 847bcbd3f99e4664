"""Several plans of one model live at once, and the runtime adapter moving requests among them.

Real parts throughout: in-process agents emulating catalogue devices (paced compute), real gRPC
servers on loopback, the adapter's LP solved with CVXPY. Traffic is a closed loop of concurrent
requests, so a slowed plan really serves fewer requests per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import torch

from doramesh import models
from doramesh.errors import DeadlineExceeded, FailedPrecondition
from doramesh.sdk import AsyncClient
from doramesh.testing import LocalFleet
from doramesh.testing.fleet import wait_for_async
from doramesh.types import DeviceShare, Flow, NodeId, Plan, PlanId, Prediction, StagePlan

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

MODEL = "resnet18"
#: Large enough that the emulated device, not this shared host, sets each computation's time.
SHAPE = (3, 128, 128)
TOLERANCE = 1e-5
#: Re-weights allowed over slow-down and recovery: one each way is what happens (2 seen); the
#: rest is slack for the speed estimate taking a second step on a loaded host.
MAX_REWEIGHTS = 5


def whole_model_plan(node_id: str) -> Plan:
    last = models.get_spec(MODEL).num_blocks - 1
    return Plan(
        plan_id=PlanId(f"replica-{node_id}"),
        stages=(StagePlan(0, last, (DeviceShare(NodeId(node_id), 1.0),)),),
        microbatch=1,
        flows=(),
        predicted=Prediction(0.0, 0.0, 0.0),
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fleet() -> AsyncIterator[LocalFleet]:
    async with LocalFleet(classes=("raspberry-pi-4", "raspberry-pi-4"), mdns=False) as f:
        yield f


class Traffic:
    """A closed loop of ``workers`` concurrent requests until stopped; checks every answer."""

    def __init__(self, client: AsyncClient, workers: int = 6) -> None:
        self.client = client
        self.workers = workers
        self.x = models.example_input(MODEL, 1, seed=5, sample_shape=SHAPE)
        self.answers = 0
        self.outputs: list[torch.Tensor] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self) -> None:
        while True:
            result = await self.client.infer_result(MODEL, self.x)
            self.answers += 1
            if len(self.outputs) < 8:
                self.outputs.append(result.output)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def set_slowdown(fleet: LocalFleet, index: int, factor: float) -> None:
    """The emulating agent's pacing, changed live (in process; ``SetSlowdown`` does the same
    over gRPC for the coordinator's role)."""
    runtime = fleet.agents[index].runtime
    assert runtime is not None
    runtime.pacer.slowdown = factor


async def test_adapter_shifts_share_from_slowed_plan_and_back(fleet: LocalFleet) -> None:
    a, b = (agent.settings.node_id for agent in fleet.agents)
    async with AsyncClient(fleet.address, timeout=60) as client:
        await client.deploy(MODEL, seed=4, plans=[whole_model_plan(a), whole_model_plan(b)])
        status = await client.job_status(MODEL)
        assert len(status.live) == 2
        epoch_a = next(d.plan_epoch for d in status.live if d.plan.device_ids == (a,))

        async def share_a() -> float:
            st = await client.job_status(MODEL)
            return next(d.share for d in st.live if d.plan_epoch == epoch_a)

        # Equal devices, but each profile was measured on a busy shared host: near, not at, 1/2.
        assert abs(await share_a() - 0.5) < 0.2
        traffic = Traffic(client)
        traffic.start()
        try:
            await asyncio.sleep(2.0)  # settle: both plans measured at their own speed
            start_reweights = (await client.job_status(MODEL)).reweights
            balanced = await share_a()
            assert 0.25 < balanced < 0.75, balanced

            set_slowdown(fleet, 0, 3.0)
            slowed_at = time.monotonic()
            await wait_for_async(lambda: _below(share_a, balanced * 0.7), timeout=30)
            shift_s = time.monotonic() - slowed_at
            low = await share_a()
            # 3x slower: a third of its rate, e.g. 1/4 of the requests from 1/2.
            assert low < balanced * 0.7, (balanced, low)

            set_slowdown(fleet, 0, 1.0)
            await wait_for_async(lambda: _above(share_a, balanced * 0.8), timeout=30)
            await asyncio.sleep(2.0)  # steady again: no further moves expected
            final = await share_a()
            status = await client.job_status(MODEL)
        finally:
            await traffic.stop()
    assert abs(final - balanced) < 0.12, (balanced, final)
    moves = status.reweights - start_reweights
    assert 2 <= moves <= MAX_REWEIGHTS, f"{moves} re-weights: the shares flapped"
    assert shift_s < 15
    reference = models.build_blocks(MODEL, 4)
    with torch.inference_mode():
        want = reference(traffic.x)
    assert traffic.answers > 20
    for out in traffic.outputs:
        assert (out - want).abs().max().item() <= TOLERANCE


async def _below(get: object, level: float) -> bool:
    assert callable(get)
    return bool(await get() < level)


async def _above(get: object, level: float) -> bool:
    assert callable(get)
    return bool(await get() > level)


def two_stage_plan(a: str, b: str, *, rate_mbps: float = 0.0, burst_kb: float = 0.0) -> Plan:
    """The stem on ``a``, the rest on ``b``; the stem's output (64x32x32 floats per sample at
    128x128 input, 256 KiB) crosses the flow a->b, paced as given."""
    last = models.get_spec(MODEL).num_blocks - 1
    return Plan(
        plan_id=PlanId(f"split-{a}-{b}"),
        stages=(
            StagePlan(0, 0, (DeviceShare(NodeId(a), 1.0),)),
            StagePlan(1, last, (DeviceShare(NodeId(b), 1.0),)),
        ),
        microbatch=1,
        flows=(Flow(NodeId(a), NodeId(b), rate_mbps, burst_kb),),
        predicted=Prediction(0.0, 0.0, 0.0),
    )


async def _timed(client: AsyncClient, x: torch.Tensor, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await client.infer(MODEL, x)
        times.append(time.perf_counter() - start)
    return times


async def test_flow_rate_changed_live_takes_effect(fleet: LocalFleet) -> None:
    a, b = (agent.settings.node_id for agent in fleet.agents)
    coordinator = fleet.coordinator
    assert coordinator is not None and coordinator.deployer is not None
    x = models.example_input(MODEL, 1, seed=1, sample_shape=SHAPE)
    async with AsyncClient(fleet.address, timeout=60) as client:
        await client.deploy(MODEL, seed=4, plans=[two_stage_plan(a, b, rate_mbps=2, burst_kb=64)])
        await client.infer(MODEL, x)  # the first transfer spends the bucket's burst
        slow = await _timed(client, x, 2)
        changed = await coordinator.deployer.set_flow_rate(MODEL, NodeId(a), NodeId(b), 800, 512)
        fast = await _timed(client, x, 2)
    assert changed == 1
    runtime = fleet.agents[0].runtime
    assert runtime is not None
    (stage,) = [s for s in runtime.stages.values() if s.spec.first == 0]
    bucket = stage.next[0].link.bucket
    assert bucket is not None and bucket.rate == pytest.approx(800e6 / 8)
    # 256 KiB at 2 Mbit/s is ~1 s of tokens per request; at 800 Mbit/s a few milliseconds.
    assert min(slow) > 0.8, slow
    assert max(fast) < 0.5, fast


async def test_cancelled_requests_are_dropped_by_the_agents(fleet: LocalFleet) -> None:
    a, b = (agent.settings.node_id for agent in fleet.agents)
    first, second = (agent.runtime for agent in fleet.agents)
    assert first is not None and second is not None
    x = models.example_input(MODEL, 1, seed=2, sample_shape=SHAPE)
    async with AsyncClient(fleet.address, timeout=60) as client:
        await client.deploy(MODEL, seed=4, plans=[two_stage_plan(a, b)])
        await client.infer(MODEL, x)
        (stage,) = [s for s in second.stages.values() if s.spec.first == 1]
        served_before = stage.served
        dropped_before = first.cancelled_microbatches
        # The stem now takes ~seconds a microbatch: requests queue on the first agent.
        first.pacer.slowdown = 400.0
        try:
            by_deadline = [
                asyncio.create_task(client.infer(MODEL, x, timeout=0.5)) for _ in range(3)
            ]
            by_cancel = asyncio.create_task(client.infer(MODEL, x, timeout=60))
            await asyncio.sleep(0.5)
            by_cancel.cancel()
            for task in by_deadline:
                with pytest.raises(DeadlineExceeded):
                    await task
            with pytest.raises(asyncio.CancelledError):
                await by_cancel
            # Every request's microbatch was dropped where it was, none reached the next stage.
            await wait_for_async(lambda: first.cancelled_microbatches - dropped_before >= 4, 10)
            await asyncio.sleep(1.0)
            assert stage.served == served_before
            assert not first.inflight
        finally:
            first.pacer.slowdown = 1.0
        # The fleet still serves.
        out = await client.infer(MODEL, x)
    with torch.inference_mode():
        want = models.build_blocks(MODEL, 4)(x)
    assert (out - want).abs().max().item() <= TOLERANCE


async def test_old_epoch_traffic_is_refused(fleet: LocalFleet) -> None:
    a, b = (agent.settings.node_id for agent in fleet.agents)
    coordinator = fleet.coordinator
    assert coordinator is not None and coordinator.deployer is not None
    async with AsyncClient(fleet.address, timeout=60) as client:
        await client.deploy(MODEL, seed=4, plans=[whole_model_plan(a)])
        old = coordinator.deployer.live[MODEL].primary
        await client.deploy(MODEL, seed=4, plans=[whole_model_plan(a), whole_model_plan(b)])
        x = models.example_input(MODEL, 1, seed=3, sample_shape=SHAPE)
        # Traffic of the retired epoch reaching its agent is refused by name.
        runtime = fleet.agents[0].runtime
        assert runtime is not None
        with pytest.raises(FailedPrecondition, match="retired"):
            runtime.get(old.replicas[0][0].stage_id, old.plan_epoch)
        # ...while the new epochs answer, on both plans.
        results = [await client.infer_result(MODEL, x) for _ in range(4)]
    assert len({r.plan_epoch for r in results}) == 2
    assert old.plan_epoch not in {r.plan_epoch for r in results}


async def test_an_agent_dying_under_two_plans_costs_no_request() -> None:
    """Two plans live; one plan's agent is killed mid-stream: its plan is dropped at once, its
    requests replayed on the other plan, new plans go live in the background; every request is
    answered once, in order, equal to the local model."""
    classes = ("raspberry-pi-5", "raspberry-pi-5", "raspberry-pi-4")
    async with LocalFleet(classes=classes, mdns=False) as fleet:
        a, b, _ = (agent.settings.node_id for agent in fleet.agents)
        coordinator = fleet.coordinator
        assert coordinator is not None and coordinator.deployer is not None
        async with AsyncClient(fleet.address, timeout=300) as client:
            await client.deploy(MODEL, seed=6, plans=[whole_model_plan(a), whole_model_plan(b)])
            inputs = [models.example_input(MODEL, 1, seed=i, sample_shape=SHAPE) for i in range(80)]
            results = []
            killed_at = 0.0
            async for result in client.infer_many(MODEL, inputs):
                results.append(result)
                if len(results) == 20:
                    killed_at = time.monotonic()
                    asyncio.get_running_loop().create_task(fleet.kill_agent(1))
            live = coordinator.deployer.live[MODEL]
            await wait_for_async(lambda: bool(coordinator.deployer.live[MODEL].replan_live_s), 60)
            status = await client.job_status(MODEL)
    assert [r.request_id for r in results] == [str(i) for i in range(len(inputs))]
    reference = models.build_blocks(MODEL, 6)
    with torch.inference_mode():
        for x, r in zip(inputs, results, strict=True):
            assert (r.output - reference(x)).abs().max().item() <= TOLERANCE
    dropped = [w for w in live.reweights if w.at >= killed_at and "died" in w.reason]
    assert dropped, "the dead agent's plan was dropped with a re-weight"
    assert all(b not in d.plan.device_ids for d in status.live)
    assert status.replan_live_s


async def test_a_request_is_split_into_microbatches_across_plans(fleet: LocalFleet) -> None:
    a, b = (agent.settings.node_id for agent in fleet.agents)
    coordinator = fleet.coordinator
    assert coordinator is not None and coordinator.deployer is not None
    async with AsyncClient(fleet.address, timeout=60) as client:
        await client.deploy(MODEL, seed=8, plans=[whole_model_plan(a), whole_model_plan(b)])
        live = coordinator.deployer.live[MODEL]
        x = models.example_input(MODEL, 6, seed=9, sample_shape=SHAPE)
        got = await client.infer(MODEL, x)
    # Six microbatches of one sample, spread by the shares (near 1/2 each: equal devices,
    # profiled on a busy host).
    served = [d.served for d in live.plans.values()]
    assert sum(served) == 6 and min(served) >= 2, served
    with torch.inference_mode():
        want = models.build_blocks(MODEL, 8)(x)
    assert (got - want).abs().max().item() <= TOLERANCE
