"""The Agent gRPC servicer: thin, validating, calling the stage runtime.

``Forward`` carries inference and training on the same kind of stream; a header with ``train``
set is a training part, whose answer is the gradient of the loss with respect to the part's
input (the backward pass, travelling upstream on the response path) and the part's loss.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import structlog
import torch

from doramesh import models
from doramesh.admission import InflightLimit
from doramesh.agent.power import PowerModeSwitch, no_switch
from doramesh.agent.runtime import LoadedStage, NextHopSpec, StageRuntime, StageSpec
from doramesh.agent.training import ReplicaPeerSpec, TrainSettings, check_tag
from doramesh.channels import CHUNK_BYTES
from doramesh.convert import profile_to_pb
from doramesh.errors import (
    Cancelled,
    DoraMeshError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
)
from doramesh.servicing import unary_errors
from doramesh.streams import FRAME_BYTES, MAX_TENSOR_BYTES, fan_out
from doramesh.tensors import Frame, FrameAssembler, iter_frames, iter_wire_frames
from doramesh.training import TrainPart, optimizer_from_pb, tagged_frames, train_fan_out
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
        train=_train_from_request(req) if req.HasField("train") else None,
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


def _train_from_request(req: agent_pb2.LoadStageRequest) -> TrainSettings:
    train = req.train
    if not _ID.match(train.job_id):
        raise InvalidArgument(f"train.job_id {train.job_id!r} is not a valid id")
    if len(train.group) > MAX_NEXT_HOPS:
        raise InvalidArgument(f"at most {MAX_NEXT_HOPS} replicas in a group")
    group = []
    for i, peer in enumerate(train.group):
        if not _ADDRESS.match(peer.address):
            raise InvalidArgument(f"train.group[{i}].address {peer.address!r} is not host:port")
        if not _ID.match(peer.stage_id):
            raise InvalidArgument(f"train.group[{i}].stage_id {peer.stage_id!r} is not valid")
        group.append(ReplicaPeerSpec(peer.address, peer.stage_id))
    if group and (train.rank >= len(group) or group[train.rank].stage_id != req.stage_id):
        raise InvalidArgument(
            f"train.rank {train.rank} does not name this stage {req.stage_id!r} in its group"
        )
    if train.resume_tag:
        check_tag(train.resume_tag)
    return TrainSettings(
        job_id=train.job_id,
        optimizer=optimizer_from_pb(train.optimizer),
        rank=train.rank,
        group=tuple(group),
        resume_tag=train.resume_tag,
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
    def __init__(
        self,
        profile: DeviceProfile,
        runtime: StageRuntime,
        *,
        max_inflight_microbatches: int,
        power: PowerModeSwitch | None = None,
    ) -> None:
        self.profile = profile
        self.runtime = runtime
        #: The power modes this agent can switch to (its profile advertises exactly these).
        self.power = power if power is not None else no_switch()
        #: The mode each loaded stage's plan asked for; the device runs the fastest of them.
        self._stage_modes: dict[str, str] = {}
        #: Microbatches at work over all Forward streams (each stream's own bound,
        #: ``MAX_INFLIGHT_PER_STREAM``, only slows its sender): the excess is answered at once.
        self.admission = InflightLimit(max_inflight_microbatches, "microbatches")

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
        live = {k: v for k, v in self._stage_modes.items() if k in self.runtime.stages}
        # Switch first: a stage priced at a mode must not run at another one. Refused: nothing
        # is loaded and the coordinator sees FAILED_PRECONDITION.
        self.power.apply(self.power.fastest([*live.values(), request.power_mode]))
        try:
            stage, cache_hit, seconds = await self.runtime.load(spec)
        except BaseException:
            self.power.apply(self.power.fastest(live.values()))
            raise
        self._stage_modes = {**live, spec.stage_id: request.power_mode}
        return agent_pb2.LoadStageResponse(
            stage_id=spec.stage_id,
            param_bytes=stage.param_bytes,
            cache_hit=cache_hit,
            load_seconds=seconds,
            resumed_step=stage.trainer.step if stage.trainer is not None else 0,
        )

    @unary_errors
    async def UnloadStage(
        self, request: agent_pb2.UnloadStageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.UnloadStageResponse:
        unloaded = await self.runtime.unload(request.stage_id)
        self._stage_modes = {k: v for k, v in self._stage_modes.items() if k in self.runtime.stages}
        self.power.apply(self.power.fastest(self._stage_modes.values()))
        return agent_pb2.UnloadStageResponse(unloaded=unloaded)

    async def Forward(
        self,
        request_iterator: AsyncIterator[Frame],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Frame]:
        """Assemble microbatches, run them through this stage and the rest of the pipeline,
        answer with each one's final result.

        A malformed frame ends the whole stream with its status (the sender is broken); a failure
        of one microbatch (bad shape for this stage, a dead downstream peer) is answered as an
        error frame for that microbatch and the stream goes on. Frames come and go through the
        frame codec (``streams.add_agent_servicer``).
        """
        out: asyncio.Queue[Frame | BaseException | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(MAX_INFLIGHT_PER_STREAM)

        async def handle(header: agent_pb2.ActivationHeader, x: torch.Tensor) -> None:
            try:
                if self.runtime.is_cancelled(header.request_id):
                    self.runtime.cancelled_microbatches += 1
                    raise Cancelled(f"request {header.request_id!r} was cancelled")
                stage = self.runtime.get(header.stage_id, header.plan_epoch)
                if header.HasField("train"):
                    async for frame in self._train_part(stage, header, x):
                        await out.put(frame)
                    return
                if stage.trainer is not None:
                    raise FailedPrecondition(
                        f"stage {stage.spec.stage_id!r} is loaded for training, not inference"
                    )
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
                for wire in iter_wire_frames(
                    y,
                    stage_id=header.stage_id,
                    plan_epoch=header.plan_epoch,
                    request_id=header.request_id,
                    microbatch_id=header.microbatch_id,
                    chunk_bytes=FRAME_BYTES,
                    compute_ms=compute_ms,
                ):
                    await out.put(wire)
            except DoraMeshError as err:
                await out.put(_error_frame(header, err))
            except asyncio.CancelledError:
                # Dropped by CancelRequest (or the stream ended): tell the sender, whose own
                # work for the request is being dropped too, so nothing waits on it.
                out.put_nowait(_error_frame(header, Cancelled("request cancelled")))
            except Exception as err:  # one microbatch must not take the stream down
                _log.exception("microbatch failed", stage_id=header.stage_id)
                await out.put(_error_frame(header, DoraMeshError(f"internal error: {err}")))
            finally:
                slots.release()

        async def read() -> None:
            assembler = FrameAssembler(
                MAX_TENSOR_BYTES, max_chunk_bytes=FRAME_BYTES, max_pending=MAX_INFLIGHT_PER_STREAM
            )
            try:
                async for frame in request_iterator:
                    done = assembler.feed(frame)
                    if done is None:
                        continue
                    await slots.acquire()
                    if not self.admission.try_acquire():
                        slots.release()
                        await out.put(_error_frame(done[0], self.admission.refusal()))
                        continue
                    task = asyncio.create_task(handle(*done))
                    # A callback, not handle's finally: a task cancelled before it ever ran
                    # (the stream ended) never enters its body, and the slot must come back.
                    task.add_done_callback(lambda _: self.admission.release())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    self.runtime.track(done[0].request_id, task)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                await out.put(None)
            except DoraMeshError as err:
                await out.put(err)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                await out.put(err)
            except Exception as err:  # a bug here must end the stream, not leave it hanging
                _log.exception("Forward stream failed")
                await out.put(Internal(f"internal error: {err}"))

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

    async def _train_part(
        self, stage: LoadedStage, header: agent_pb2.ActivationHeader, x: torch.Tensor
    ) -> AsyncIterator[agent_pb2.ActivationFrame]:
        """One training part: forward with autograd, the rest of the pipeline (or the loss, at
        the last stage), backward; answers with the gradient of the input and the loss.

        The part's graph lives in this coroutine's locals while it waits for the gradient of its
        output, and is freed as soon as the backward pass has run.
        """
        trainer = stage.require_trainer()
        part = TrainPart.from_pb(header.train, x.shape[0] if x.dim() > 0 else 0)
        if part.job_id != trainer.settings.job_id:
            raise FailedPrecondition(
                f"part of job {part.job_id!r}; stage trains job {trainer.settings.job_id!r}"
            )
        trainer.check_step(part.step)
        leaf, y, fwd_s = await self.runtime.train_forward(stage, x)
        if stage.train_next:
            below = await train_fan_out(
                stage.train_next, y.detach(), part, plan_epoch=stage.spec.plan_epoch
            )
            grad_x, bwd_s = await self.runtime.train_backward(stage, leaf, y, below.grad)
            loss, below_ms = below.loss, below.compute_ms
        else:
            grad_x, loss, bwd_s = await self.runtime.train_loss_backward(
                stage, leaf, y, part.labels, part.loss_scale
            )
            below_ms = 0.0
        del leaf, y
        stage.served += 1

        def tag(h: agent_pb2.ActivationHeader) -> None:
            h.loss = loss

        for frame in tagged_frames(
            grad_x,
            tag,
            stage_id=header.stage_id,
            plan_epoch=header.plan_epoch,
            request_id=header.request_id,
            microbatch_id=header.microbatch_id,
            compute_ms=(fwd_s + bwd_s) * 1e3 + below_ms,
        ):
            yield frame

    @unary_errors
    async def TrainStep(
        self, request: agent_pb2.TrainStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.TrainStepResponse:
        stage = self.runtime.get(request.stage_id, request.plan_epoch)
        result = await self.runtime.train_step(
            stage, request.step, timeout=context.time_remaining()
        )
        return agent_pb2.TrainStepResponse(
            step=result.step,
            parts=result.parts,
            sync_ms=result.sync_s * 1e3,
            step_ms=result.step_s * 1e3,
        )

    async def SyncGradients(
        self,
        request_iterator: AsyncIterator[agent_pb2.ActivationFrame],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.ActivationFrame]:
        """Rank 0's end of a replica's gradient exchange: its flat gradients in (validated
        against this stage's layout before any buffer is allocated), the group's sum out."""
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or not first.HasField("header") or not first.header.HasField("sync"):
                raise InvalidArgument("SyncGradients must start with a header carrying `sync`")
            head = first.header
            stage = self.runtime.get(head.stage_id, head.plan_epoch)
            trainer = stage.require_trainer()
            layout = trainer.flat_layout()
            if head.sync.count != len(layout):
                raise InvalidArgument(
                    f"{head.sync.count} gradient tensors sent; this stage has {len(layout)}"
                )
            max_bytes = max(n * torch.empty((), dtype=d).element_size() for d, n in layout)
            assembler = FrameAssembler(
                max_bytes, max_chunk_bytes=CHUNK_BYTES, max_pending=len(layout)
            )
            got: dict[int, torch.Tensor] = {}

            def take(frame: agent_pb2.ActivationFrame) -> None:
                if frame.HasField("header") and (
                    frame.header.sync.step != head.sync.step
                    or frame.header.sync.rank != head.sync.rank
                    or frame.header.microbatch_id >= len(layout)
                ):
                    raise InvalidArgument("gradient frames disagree on step, rank or index")
                done = assembler.feed(frame)
                if done is not None:
                    got[done[0].microbatch_id] = done[1]

            take(first)
            async for frame in request_iterator:
                take(frame)
            if sorted(got) != list(range(len(layout))):
                raise InvalidArgument(f"{len(got)} of {len(layout)} gradient tensors arrived")
            summed = await self.runtime.contribute_gradients(
                stage, head.sync.step, head.sync.rank, [got[i] for i in range(len(layout))]
            )
        except DoraMeshError as err:
            _log.info("gradient sync refused", status=err.status.name, error=err.message)
            await context.abort(err.status.grpc_code, err.message)
            return
        for i, t in enumerate(summed):
            for frame in iter_frames(
                t,
                stage_id=head.stage_id,
                plan_epoch=head.plan_epoch,
                request_id=head.request_id,
                microbatch_id=i,
            ):
                yield frame

    @unary_errors
    async def GetStats(
        self, request: agent_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.AgentStats:
        rt = self.runtime
        return agent_pb2.AgentStats(
            node_id=self.profile.node_id,
            computations=rt.computations,
            seconds_per_gflop=rt.seconds_per_gflop,
            slowdown=rt.pacer.slowdown,
            cancelled_microbatches=rt.cancelled_microbatches,
            stages=[
                agent_pb2.StageStats(
                    stage_id=s.spec.stage_id,
                    plan_epoch=s.spec.plan_epoch,
                    served=s.served,
                    compute_s=s.compute_s,
                )
                for s in rt.stages.values()
            ],
        )

    @unary_errors
    async def SetFlowRate(
        self, request: agent_pb2.SetFlowRateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.SetFlowRateResponse:
        if not (math.isfinite(request.rate_mbps) and request.rate_mbps >= 0):
            raise InvalidArgument(f"rate_mbps must be >= 0, got {request.rate_mbps}")
        if not (math.isfinite(request.burst_kb) and request.burst_kb >= 0):
            raise InvalidArgument(f"burst_kb must be >= 0, got {request.burst_kb}")
        bucket = self.runtime.set_flow_rate(
            request.stage_id, request.next_stage_id, request.rate_mbps, request.burst_kb
        )
        if bucket is None or bucket.rate is None:
            return agent_pb2.SetFlowRateResponse()
        return agent_pb2.SetFlowRateResponse(
            rate_mbps=bucket.rate * 8 / 1e6, burst_kb=bucket.burst / 1e3
        )

    @unary_errors
    async def CancelRequest(
        self, request: agent_pb2.CancelRequestRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.CancelRequestResponse:
        if not _ID.match(request.request_id):
            raise InvalidArgument(f"request_id {request.request_id!r} is not a valid id")
        return agent_pb2.CancelRequestResponse(dropped=self.runtime.cancel(request.request_id))

    @unary_errors
    async def SetSlowdown(
        self, request: agent_pb2.SetSlowdownRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.SetSlowdownResponse:
        try:
            self.runtime.pacer.slowdown = request.slowdown
        except ValueError as err:
            raise InvalidArgument(str(err)) from err
        _log.info("slowdown set", slowdown=request.slowdown)
        return agent_pb2.SetSlowdownResponse(slowdown=self.runtime.pacer.slowdown)

    @unary_errors
    async def SaveCheckpoint(
        self, request: agent_pb2.SaveCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.SaveCheckpointResponse:
        check_tag(request.tag)
        stage = self.runtime.get(request.stage_id, request.plan_epoch)
        path, size, digest = await self.runtime.save_checkpoint(stage, request.tag, request.step)
        return agent_pb2.SaveCheckpointResponse(path=path, bytes=size, sha256=digest)
