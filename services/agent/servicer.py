"""The Agent gRPC servicer: thin, validating, calling the stage runtime."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import structlog
import torch

from doramesh import models
from doramesh.agent.runtime import NextHopSpec, StageRuntime, StageSpec
from doramesh.channels import CHUNK_BYTES
from doramesh.convert import profile_to_pb
from doramesh.errors import DoraMeshError, InvalidArgument
from doramesh.servicing import unary_errors
from doramesh.streams import MAX_TENSOR_BYTES, fan_out
from doramesh.tensors import FrameAssembler, iter_frames
from doramesh.types import DeviceProfile
from doramesh.v1 import agent_pb2, agent_pb2_grpc, common_pb2

_log = structlog.get_logger("agent")

_ID = re.compile(r"^[A-Za-z0-9_.:@/-]{1,200}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]{1,255}:\d{1,5}$")
#: Microbatches one upstream stream may have in flight on this agent.
MAX_INFLIGHT_PER_STREAM = 32
#: Replicas of one next stage an agent may fan out to.
MAX_NEXT_HOPS = 64


def _spec_from_request(req: agent_pb2.LoadStageRequest) -> StageSpec:
    if not _ID.match(req.stage_id):
        raise InvalidArgument(f"stage_id {req.stage_id!r} is not a valid id")
    if not req.model:
        raise InvalidArgument("model is required")
    models.require_served(req.model)
    if req.last < req.first:
        raise InvalidArgument(f"last layer {req.last} is before first layer {req.first}")
    if not re.fullmatch(r"[0-9a-f]{64}", req.weights_digest):
        raise InvalidArgument("weights_digest must be a sha256 hex digest")
    if not _ADDRESS.match(req.weights_source):
        raise InvalidArgument(f"weights_source {req.weights_source!r} is not host:port")
    if len(req.next) > MAX_NEXT_HOPS:
        raise InvalidArgument(f"at most {MAX_NEXT_HOPS} next hops, got {len(req.next)}")
    for i, hop in enumerate(req.next):
        if not _ADDRESS.match(hop.address):
            raise InvalidArgument(f"next[{i}].address {hop.address!r} is not host:port")
        if not _ID.match(hop.stage_id):
            raise InvalidArgument(f"next[{i}].stage_id {hop.stage_id!r} is not a valid id")
        if not (0 < hop.share <= 1):
            raise InvalidArgument(f"next[{i}].share must be in (0, 1], got {hop.share}")
        if hop.rate_mbps < 0 or hop.burst_kb < 0:
            raise InvalidArgument(f"next[{i}]: rate_mbps and burst_kb must be non-negative")
    return StageSpec(
        stage_id=req.stage_id,
        plan_epoch=req.plan_epoch,
        model=req.model,
        seed=req.seed,
        first=req.first,
        last=req.last,
        weights_digest=req.weights_digest,
        weights_source=req.weights_source,
        next=tuple(
            NextHopSpec(h.address, h.stage_id, h.share, h.rate_mbps, h.burst_kb) for h in req.next
        ),
    )


def _error_frame(
    header: agent_pb2.ActivationHeader, err: DoraMeshError
) -> agent_pb2.ActivationFrame:
    return agent_pb2.ActivationFrame(
        header=agent_pb2.ActivationHeader(
            stage_id=header.stage_id,
            plan_epoch=header.plan_epoch,
            request_id=header.request_id,
            microbatch_id=header.microbatch_id,
            error=err.message,
            error_code=err.status.value,
        )
    )


class AgentServicer(agent_pb2_grpc.AgentServicer):
    def __init__(self, profile: DeviceProfile, runtime: StageRuntime) -> None:
        self.profile = profile
        self.runtime = runtime

    @unary_errors
    async def GetProfile(
        self, request: agent_pb2.GetProfileRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> common_pb2.DeviceProfile:
        return profile_to_pb(self.profile)

    @unary_errors
    async def LoadStage(
        self, request: agent_pb2.LoadStageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.LoadStageResponse:
        spec = _spec_from_request(request)
        stage, cache_hit, seconds = await self.runtime.load(spec)
        return agent_pb2.LoadStageResponse(
            stage_id=spec.stage_id,
            param_bytes=stage.param_bytes,
            cache_hit=cache_hit,
            load_seconds=seconds,
        )

    @unary_errors
    async def UnloadStage(
        self, request: agent_pb2.UnloadStageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.UnloadStageResponse:
        return agent_pb2.UnloadStageResponse(unloaded=await self.runtime.unload(request.stage_id))

    async def Forward(
        self,
        request_iterator: AsyncIterator[agent_pb2.ActivationFrame],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.ActivationFrame]:
        """Assemble microbatches, run them through this stage and the rest of the pipeline,
        answer with each one's final result.

        A malformed frame ends the whole stream with its status (the sender is broken); a failure
        of one microbatch (bad shape for this stage, a dead downstream peer) is answered as an
        error frame for that microbatch and the stream goes on.
        """
        out: asyncio.Queue[agent_pb2.ActivationFrame | BaseException | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(MAX_INFLIGHT_PER_STREAM)

        async def handle(header: agent_pb2.ActivationHeader, x: torch.Tensor) -> None:
            try:
                stage = self.runtime.get(header.stage_id, header.plan_epoch)
                y, seconds = await self.runtime.compute(stage, x)
                compute_ms = seconds * 1e3
                if stage.next:
                    result = await fan_out(
                        stage.next,
                        y,
                        plan_epoch=stage.spec.plan_epoch,
                        request_id=header.request_id,
                    )
                    y, compute_ms = result.tensor, compute_ms + result.compute_ms
                for frame in iter_frames(
                    y,
                    stage_id=header.stage_id,
                    plan_epoch=header.plan_epoch,
                    request_id=header.request_id,
                    microbatch_id=header.microbatch_id,
                    compute_ms=compute_ms,
                ):
                    await out.put(frame)
            except DoraMeshError as err:
                await out.put(_error_frame(header, err))
            except Exception as err:  # one microbatch must not take the stream down
                _log.exception("microbatch failed", stage_id=header.stage_id)
                await out.put(_error_frame(header, DoraMeshError(f"internal error: {err}")))
            finally:
                slots.release()

        async def read() -> None:
            assembler = FrameAssembler(
                MAX_TENSOR_BYTES, max_chunk_bytes=CHUNK_BYTES, max_pending=MAX_INFLIGHT_PER_STREAM
            )
            try:
                async for frame in request_iterator:
                    done = assembler.feed(frame)
                    if done is None:
                        continue
                    await slots.acquire()
                    task = asyncio.create_task(handle(*done))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                await out.put(None)
            except DoraMeshError as err:
                await out.put(err)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                await out.put(err)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await out.get()
                if item is None:
                    return
                if isinstance(item, DoraMeshError):
                    _log.info("stream refused", status=item.status.name, error=item.message)
                    await context.abort(item.status.grpc_code, item.message)
                if isinstance(item, BaseException):
                    return
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
