"""The planner service over a real gRPC channel on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from doramesh import channels, convert
from doramesh.planner.servicer import SERVICE_NAME, PlannerServer
from doramesh.types import DeviceProfile, LayerInfo, LayerTable, Network, NodeId, QoESpec, Workload
from doramesh.v1 import planner_pb2, planner_pb2_grpc

DEADLINE_S = 20.0


def _devices(count: int = 3) -> list[DeviceProfile]:
    return [
        DeviceProfile(
            node_id=NodeId(f"dev-{k}"),
            device_class="test",
            gflops=10.0 * (k + 1),
            memory_bytes=400_000_000,
            power_idle_w=2.0,
            power_active_w=6.0,
            power_tx_w=1.0,
        )
        for k in range(count)
    ]


def _table(layers: int = 8) -> LayerTable:
    return LayerTable(
        "test-model",
        tuple(LayerInfo(f"block{i}", 0.5, 100_000_000, 500_000) for i in range(layers)),
        input_bytes=4096,
    )


def _request(
    qoe: QoESpec, *, planner: str = "", devices: list[DeviceProfile] | None = None
) -> planner_pb2.PlanRequest:
    return planner_pb2.PlanRequest(
        devices=[convert.profile_to_pb(d) for d in (devices or _devices())],
        network=convert.network_to_pb(Network("shared", bandwidth_mbps=100, latency_ms=2)),
        model=convert.layer_table_to_pb(_table()),
        workload=convert.workload_to_pb(Workload("inference", batch=1, rate_rps=2.0)),
        qoe=convert.qoe_to_pb(qoe),
        max_plans=2,
        planner=planner,
    )


@pytest_asyncio.fixture
async def planner_address() -> AsyncIterator[str]:
    server = PlannerServer("127.0.0.1:0")
    address = await server.start()
    try:
        yield address
    finally:
        await server.stop(0.5)


@pytest_asyncio.fixture
async def stub(planner_address: str) -> AsyncIterator[planner_pb2_grpc.PlannerStub]:
    async with channels.create_channel(planner_address) as channel:
        yield planner_pb2_grpc.PlannerStub(channel)  # type: ignore[no-untyped-call]


async def test_plan_over_grpc(stub: planner_pb2_grpc.PlannerStub) -> None:
    response = await stub.Plan(_request(QoESpec("min_energy", latency_ms=5000)), timeout=DEADLINE_S)
    assert response.planner == "doramesh"
    assert response.plan_seconds > 0
    plan_set = convert.plan_set_from_pb(response.plan_set)
    assert 1 <= len(plan_set.plans) <= 2
    best = plan_set.plans[0]
    # 400 MB parameters on 400 MB devices: at least two stages
    assert len(best.stages) >= 2
    assert best.stages[0].first == 0 and best.stages[-1].last == 7
    assert best.predicted.latency_ms <= 5000
    assert plan_set.mix[best.plan_id] == 1.0


async def test_impossible_qoe_is_explained_and_the_server_keeps_serving(
    stub: planner_pb2_grpc.PlannerStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Plan(_request(QoESpec("min_energy", latency_ms=1)), timeout=DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "latency_ms 1 cannot be met: best plan reaches" in (err.value.details() or "")
    response = await stub.Plan(_request(QoESpec("min_latency")), timeout=DEADLINE_S)
    assert len(response.plan_set.plans) >= 1


async def test_unknown_planner_is_an_invalid_argument(stub: planner_pb2_grpc.PlannerStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Plan(_request(QoESpec(), planner="oracle"), timeout=DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown planner 'oracle'" in (err.value.details() or "")


async def test_bad_input_is_an_invalid_argument(stub: planner_pb2_grpc.PlannerStub) -> None:
    broken = _devices()
    request = _request(QoESpec(), devices=broken)
    request.devices[1].gflops = 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Plan(request, timeout=DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "device dev-1: gflops must be positive" in (err.value.details() or "")
    request = _request(QoESpec())
    request.ClearField("model")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Plan(request, timeout=DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_no_devices_is_a_failed_precondition(stub: planner_pb2_grpc.PlannerStub) -> None:
    request = _request(QoESpec())
    del request.devices[:]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Plan(request, timeout=DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_health_is_serving(planner_address: str) -> None:
    async with channels.create_channel(planner_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_solving_does_not_block_the_event_loop(planner_address: str) -> None:
    """A long plan runs in a worker thread: health checks still answer at once meanwhile."""
    devices = [
        DeviceProfile(
            NodeId(f"d{k:02}"), "test", 5.0 + 13 * k, 1_500_000_000, 1, 1.0 + k, 8.0 + 2 * k, 1.0
        )
        for k in range(16)
    ]
    request = _request(QoESpec("min_energy"), devices=devices)
    request.model.CopyFrom(convert.layer_table_to_pb(_table(96)))
    request.workload.rate_rps = 0.0
    async with channels.create_channel(planner_address) as channel:
        planner = planner_pb2_grpc.PlannerStub(channel)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(channel)
        call = asyncio.ensure_future(planner.Plan(request, timeout=60.0))
        await asyncio.sleep(0.05)
        worst = 0.0
        while not call.done():
            start = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
            worst = max(worst, time.perf_counter() - start)
            await asyncio.sleep(0.02)
        response = await call
    assert len(response.plan_set.plans) >= 1
    assert worst < 0.5
