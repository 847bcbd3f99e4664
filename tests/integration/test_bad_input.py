"""Bad input gets a specific gRPC status, and the service keeps serving afterwards."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
import torch

from doramesh import models
from doramesh.channels import create_channel
from doramesh.sdk import AsyncClient
from doramesh.security.credentials import Credentials
from doramesh.streams import FRAME_BYTES
from doramesh.tensors import tensor_to_pb
from doramesh.testing import LocalFleet
from doramesh.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _peer(fleet: LocalFleet) -> Credentials | None:
    """Agents take stage control from the coordinator only: dial them as one."""
    return fleet.issue("coordinator", "test-coordinator")


async def _deployed(fleet: LocalFleet) -> AsyncClient:
    client = AsyncClient(fleet.address, timeout=60)
    await client.deploy("mlp-tiny", seed=1)
    return client


async def _still_serves(client: AsyncClient) -> None:
    out = await client.infer("mlp-tiny", models.example_input("mlp-tiny", 1))
    assert out.shape[0] == 1


async def _raw_infer(fleet: LocalFleet, tensor: common_pb2.Tensor) -> grpc.aio.AioRpcError:
    async with create_channel(fleet.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Infer(
                coordinator_pb2.InferRequest(model="mlp-tiny", input=tensor), timeout=10
            )
    return info.value


async def test_malformed_tensor_metadata(fleet: LocalFleet) -> None:
    client = await _deployed(fleet)
    bad = common_pb2.Tensor(
        meta=common_pb2.TensorMeta(dtype="float99", shape=[1, 64], byte_length=256),
        data=b"\0" * 256,
    )
    err = await _raw_infer(fleet, bad)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dtype" in (err.details() or "")
    negative = common_pb2.Tensor(
        meta=common_pb2.TensorMeta(dtype="float32", shape=[1, -64], byte_length=256),
        data=b"\0" * 256,
    )
    err = await _raw_infer(fleet, negative)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    await _still_serves(client)
    await client.close()


async def test_byte_length_does_not_match_dtype_and_shape(fleet: LocalFleet) -> None:
    client = await _deployed(fleet)
    good = tensor_to_pb(models.example_input("mlp-tiny", 1))
    lying = common_pb2.Tensor()
    lying.CopyFrom(good)
    lying.meta.byte_length = good.meta.byte_length + 4
    lying.data = good.data + b"\0\0\0\0"
    err = await _raw_infer(fleet, lying)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(good.meta.byte_length) in (err.details() or "")
    short = common_pb2.Tensor()
    short.CopyFrom(good)
    short.data = good.data[:-4]
    err = await _raw_infer(fleet, short)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    await _still_serves(client)
    await client.close()


async def test_wrong_shape_for_the_model(fleet: LocalFleet) -> None:
    client = await _deployed(fleet)
    from doramesh.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        await client.infer("mlp-tiny", torch.zeros(1, 3, 5))
    with pytest.raises(InvalidArgument):
        await client.infer("mlp-tiny", torch.zeros(1, 63))  # stage 0 rejects the width
    with pytest.raises(InvalidArgument):
        await client.infer("mlp-tiny", torch.zeros(1, 64, dtype=torch.int64))
    await _still_serves(client)
    await client.close()


async def test_oversized_chunk_on_an_activation_stream(fleet: LocalFleet) -> None:
    client = await _deployed(fleet)
    agent = fleet.agents[0]
    size = FRAME_BYTES * 2  # past the activation stream's frame limit
    frames = [
        agent_pb2.ActivationFrame(
            header=agent_pb2.ActivationHeader(
                stage_id="whatever",
                microbatch_id=1,
                meta=common_pb2.TensorMeta(dtype="uint8", shape=[size], byte_length=size),
            )
        ),
        agent_pb2.ActivationFrame(
            chunk=agent_pb2.ActivationChunk(microbatch_id=1, offset=0, data=b"\0" * size)
        ),
    ]
    async with create_channel(agent.address, credentials=_peer(fleet)) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        call = stub.Forward(iter(frames), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "chunk" in (info.value.details() or "")
    await _still_serves(client)
    await client.close()


async def test_chunk_out_of_order_on_an_activation_stream(fleet: LocalFleet) -> None:
    client = await _deployed(fleet)
    frames = [
        agent_pb2.ActivationFrame(
            header=agent_pb2.ActivationHeader(
                stage_id="whatever",
                microbatch_id=5,
                meta=common_pb2.TensorMeta(dtype="float32", shape=[4], byte_length=16),
            )
        ),
        agent_pb2.ActivationFrame(
            chunk=agent_pb2.ActivationChunk(microbatch_id=5, offset=8, data=b"\0" * 8)
        ),
    ]
    async with create_channel(fleet.agents[1].address, credentials=_peer(fleet)) as channel:
        call = agent_pb2_grpc.AgentStub(channel).Forward(iter(frames), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await _still_serves(client)
    await client.close()


async def test_unknown_stage_is_answered_per_microbatch(fleet: LocalFleet) -> None:
    from doramesh.tensors import iter_frames

    x = torch.zeros(1, 64)
    frames = list(
        iter_frames(x, stage_id="no-such-stage", plan_epoch=1, request_id="r", microbatch_id=9)
    )
    async with create_channel(fleet.agents[0].address, credentials=_peer(fleet)) as channel:
        call = agent_pb2_grpc.AgentStub(channel).Forward(iter(frames), timeout=10)
        replies = [frame async for frame in call]
    assert len(replies) == 1
    assert replies[0].header.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-stage" in replies[0].header.error


async def test_stage_that_does_not_fit_in_memory(fleet: LocalFleet) -> None:
    client = await _deployed(fleet)
    agent = fleet.agents[0]
    assert agent.profile is not None
    table = models.layer_table("llama-1b")
    data_digest = "0" * 64
    request = agent_pb2.LoadStageRequest(
        stage_id="too-big",
        plan_epoch=1,
        model="llama-1b",
        first=0,
        last=len(table.layers) - 1,
        weights_digest=data_digest,
        weights_source=fleet.address,
    )
    async with create_channel(agent.address, credentials=_peer(fleet)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await agent_pb2_grpc.AgentStub(channel).LoadStage(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MiB" in (info.value.details() or "")
    await _still_serves(client)
    await client.close()


async def test_oversized_message_is_refused_by_the_limit(fleet: LocalFleet) -> None:
    client = await _deployed(fleet)
    huge = torch.zeros(1, (65 << 20) // 4)  # 65 MiB: over the 64 MiB message limit
    from doramesh.errors import ResourceExhausted

    with pytest.raises(ResourceExhausted):
        await client.infer("mlp-tiny", huge)
    await _still_serves(client)
    await client.close()


async def test_import_paths_from_the_network_are_refused(fleet: LocalFleet) -> None:
    """A model name that is an import path would run arbitrary code on the agents."""
    from doramesh.errors import NotFound

    async with AsyncClient(fleet.address, timeout=10) as client:
        with pytest.raises(NotFound, match="import paths are not accepted"):
            await client.deploy("os:system")
        assert len(await client.fleet()) == 3
