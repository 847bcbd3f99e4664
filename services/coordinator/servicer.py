"""The client-facing Coordinator servicer: validate, convert, call the deployer."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from doramesh import convert
from doramesh.admission import InflightLimit
from doramesh.channels import MAX_MESSAGE_BYTES
from doramesh.coordinator.deploy import Deployer, Deployment
from doramesh.coordinator.mix import LiveSet
from doramesh.coordinator.registry import FleetRegistry
from doramesh.coordinator.training import (
    DEFAULT_TRAIN_TIMEOUT_S,
    StepReport,
    TrainingJobs,
    TrainJob,
)
from doramesh.errors import InvalidArgument
from doramesh.servicing import stream_errors, unary_errors
from doramesh.tensors import tensor_from_pb, tensor_to_pb
from doramesh.training import optimizer_from_pb
from doramesh.types import Workload
from doramesh.v1 import coordinator_pb2, coordinator_pb2_grpc

#: Requests one InferStream may have in flight.
MAX_STREAM_INFLIGHT = 64


def deployment_to_pb(dep: Deployment, share: float = 0.0) -> coordinator_pb2.Deployment:
    return coordinator_pb2.Deployment(
        model=dep.model,
        plan_epoch=dep.plan_epoch,
        # As the fleet-wide scheduler priced it beside other models' live plans, if any (its
        # flows are the buckets the senders enforce while pacing is on).
        plan=convert.plan_to_pb(dep.paced or dep.plan),
        status=dep.status,
        error=dep.error,
        share=share,
    )


def live_to_pb(live: LiveSet | None) -> list[coordinator_pb2.Deployment]:
    if live is None:
        return []
    return [deployment_to_pb(d, live.shares.get(k, 0.0)) for k, d in live.plans.items()]


def train_job_from_pb(request: coordinator_pb2.TrainRequest) -> TrainJob:
    """The request as a domain value (validated by ``TrainJob.check`` when the job starts)."""
    if not request.model:
        raise InvalidArgument("model is required")
    return TrainJob(
        model=request.model,
        steps=request.steps,
        batch=request.batch or 8,
        microbatches=request.microbatches or 1,
        optimizer=optimizer_from_pb(request.optimizer),
        seed=request.seed,
        data_seed=request.data_seed,
        sample_shape=tuple(request.sample_shape) or None,
        plan=convert.plan_from_pb(request.plan) if request.HasField("plan") else None,
        planner=request.planner or "doramesh",
        qoe=convert.qoe_from_pb(request.qoe) if request.HasField("qoe") else None,
        checkpoint_every=request.checkpoint_every,
        resume_from=request.resume_from,
        job_id=request.job_id,
        dataset_batches=request.dataset_batches,
    )


def progress_to_pb(report: StepReport) -> coordinator_pb2.TrainProgress:
    return coordinator_pb2.TrainProgress(
        job_id=report.job_id,
        step=report.step,
        last_step=report.last_step,
        loss=report.loss,
        step_ms=report.step_ms,
        plan_epoch=report.plan_epoch,
        plan=convert.plan_to_pb(report.plan),
        checkpoint=report.checkpoint,
        samples_per_s=report.samples_per_s,
        resumed_from=report.resumed_from,
    )


def _deadline(context: grpc.aio.ServicerContext[Any, Any], default_s: float) -> float:
    remaining = context.time_remaining()
    return default_s if remaining is None else max(0.0, remaining)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        registry: FleetRegistry,
        deployer: Deployer,
        *,
        infer_timeout_s: float,
        max_inflight_requests: int,
        training: TrainingJobs | None = None,
    ) -> None:
        self.registry = registry
        self.deployer = deployer
        self.infer_timeout_s = infer_timeout_s
        #: Shared by Infer and InferStream: a burst beyond it is shed, not queued.
        self.admission = InflightLimit(max_inflight_requests, "inference requests")
        self.training = training or TrainingJobs(deployer)

    @unary_errors
    async def Fleet(
        self, request: coordinator_pb2.FleetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.FleetView:
        now = time.monotonic()
        return coordinator_pb2.FleetView(
            agents=[
                coordinator_pb2.AgentInfo(
                    profile=convert.profile_to_pb(r.profile),
                    state=r.state,
                    last_seen_s=now - r.last_seen,
                    discovered_by=r.discovered_by,
                )
                for r in self.registry.agents.values()
            ],
            deployments=[deployment_to_pb(d) for d in self.deployer.deployments.values()],
        )

    @unary_errors
    async def Deploy(
        self, request: coordinator_pb2.DeployRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.DeployResponse:
        if not request.model:
            raise InvalidArgument("model is required")
        qoe = convert.qoe_from_pb(request.qoe) if request.HasField("qoe") else None
        workload = (
            convert.workload_from_pb(request.workload)
            if request.HasField("workload")
            else Workload()
        )
        dep = await self.deployer.deploy(
            request.model,
            seed=request.seed,
            qoe=qoe,
            workload=workload,
            planner=request.planner or "doramesh",
            plan=convert.plan_from_pb(request.plan) if request.HasField("plan") else None,
            plans=[convert.plan_from_pb(p) for p in request.plans] or None,
            max_plans=request.max_plans,
            timeout_s=_deadline(context, 600.0),
        )
        return coordinator_pb2.DeployResponse(
            deployment=deployment_to_pb(dep),
            live=live_to_pb(self.deployer.live.get(request.model)),
        )

    async def _infer(
        self, request: coordinator_pb2.InferRequest, timeout_s: float
    ) -> coordinator_pb2.InferResponse:
        with self.admission.admit():  # before the input is decoded: shedding must be cheap
            if not request.model:
                raise InvalidArgument("model is required")
            if not request.HasField("input"):
                raise InvalidArgument("input tensor is required")
            x = tensor_from_pb(request.input, max_bytes=MAX_MESSAGE_BYTES)
            request_id = request.request_id or uuid.uuid4().hex
            result, dep, latency_ms = await self.deployer.infer(
                request.model, x, request_id=request_id, timeout_s=timeout_s
            )
        return coordinator_pb2.InferResponse(
            request_id=request_id,
            output=tensor_to_pb(result.tensor),
            plan_epoch=dep.plan_epoch,
            latency_ms=latency_ms,
            compute_ms=result.compute_ms,
        )

    @unary_errors
    async def Infer(
        self, request: coordinator_pb2.InferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.InferResponse:
        return await self._infer(request, _deadline(context, self.infer_timeout_s))

    @stream_errors
    async def InferStream(
        self,
        request_iterator: AsyncIterator[coordinator_pb2.InferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[coordinator_pb2.InferResponse]:
        """Requests are pipelined through the fleet; answers come back in request order."""
        pending: asyncio.Queue[asyncio.Task[coordinator_pb2.InferResponse] | None] = asyncio.Queue(
            MAX_STREAM_INFLIGHT
        )

        async def feed() -> None:
            try:
                async for request in request_iterator:
                    timeout = _deadline(context, self.infer_timeout_s)
                    await pending.put(asyncio.create_task(self._infer(request, timeout)))
            finally:
                await pending.put(None)

        feeder = asyncio.create_task(feed())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await feeder
        finally:
            feeder.cancel()
            while not pending.empty():
                item = pending.get_nowait()
                if item is not None:
                    item.cancel()

    @unary_errors
    async def JobStatus(
        self, request: coordinator_pb2.JobStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.JobStatusResponse:
        dep = self.deployer.deployments.get(request.model)
        if dep is None:
            from doramesh.errors import NotFound

            raise NotFound(f"no deployment of {request.model!r}")
        live = self.deployer.live.get(request.model)
        plans = list(live.plans.values()) if live is not None else [dep]
        return coordinator_pb2.JobStatusResponse(
            deployment=deployment_to_pb(dep),
            requests_served=sum(d.served for d in plans),
            requests_failed=sum(d.failed for d in plans),
            latency_ms_p50=dep.percentile(0.5),
            latency_ms_p95=dep.percentile(0.95),
            live=live_to_pb(live),
            reweights=len(live.reweights) if live is not None else 0,
            requests_replayed=live.replayed if live is not None else dep.replayed,
            replan_live_s=live.replan_live_s if live is not None else [],
        )

    @unary_errors
    async def SetPacing(
        self, request: coordinator_pb2.SetPacingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.SetPacingResponse:
        changed = await self.deployer.set_pacing(request.enabled)
        return coordinator_pb2.SetPacingResponse(
            enabled=self.deployer.pacing, flows_changed=changed
        )

    @stream_errors
    async def Train(
        self, request: coordinator_pb2.TrainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[coordinator_pb2.TrainProgress]:
        """One progress message per step; the job stops (and frees its stages) if the caller
        cancels or its deadline passes."""
        job = train_job_from_pb(request)
        timeout_s = _deadline(context, DEFAULT_TRAIN_TIMEOUT_S)
        async with contextlib.aclosing(self.training.run(job, timeout_s=timeout_s)) as reports:
            async for report in reports:
                yield progress_to_pb(report)
