"""The app-facing SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Every call takes a deadline (``timeout``; the client's default otherwise) and raises a
``DoraMeshError`` subclass on failure: gRPC's own exceptions never reach the caller.

    import doramesh, torch
    with doramesh.Client("127.0.0.1:7070") as client:
        client.deploy("resnet18")
        logits = client.infer("resnet18", torch.randn(1, 3, 224, 224))
        print(client.fleet())
        for p in client.train("mlp-tiny", steps=20, batch=16, optimizer="adam", lr=1e-3):
            print(p.step, p.loss, p.step_ms)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import grpc
import grpc.aio
import torch

from doramesh import convert
from doramesh.channels import (
    MAX_MESSAGE_BYTES,
    UNSET,
    Unset,
    create_channel,
    create_sync_channel,
)
from doramesh.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    DoraMeshError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Status,
    Unavailable,
    from_rpc_error,
)
from doramesh.security.credentials import Credentials
from doramesh.security.identity import server_name
from doramesh.tensors import tensor_from_pb, tensor_to_pb
from doramesh.training import OptimizerName, OptimizerSpec, optimizer_to_pb
from doramesh.types import DeviceProfile, Plan, QoESpec, Workload
from doramesh.v1 import coordinator_pb2, coordinator_pb2_grpc

__all__ = [
    "Aborted",
    "AgentView",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "DeploymentView",
    "DoraMeshError",
    "FailedPrecondition",
    "InferResult",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OptimizerSpec",
    "ResourceExhausted",
    "Status",
    "TrainProgress",
    "Unavailable",
]

#: Deadline of a training job when ``train`` is given no ``timeout``: jobs outlive the client's
#: default deadline for single calls by far.
TRAIN_TIMEOUT_S = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class AgentView:
    profile: DeviceProfile
    state: Literal["alive", "suspect", "dead"] | str
    last_seen_s: float
    discovered_by: str


@dataclass(frozen=True, slots=True)
class DeploymentView:
    model: str
    plan_epoch: int
    plan: Plan
    status: str
    error: str
    #: Share of the model's requests this plan serves, as the runtime adapter last set it.
    share: float = 0.0


@dataclass(frozen=True, slots=True)
class InferResult:
    output: torch.Tensor
    request_id: str
    plan_epoch: int
    latency_ms: float
    compute_ms: float


@dataclass(frozen=True, slots=True)
class JobStatus:
    deployment: DeploymentView
    requests_served: int
    requests_failed: int
    latency_ms_p50: float
    latency_ms_p95: float
    #: Every live plan of the model (several run side by side), with its share.
    live: tuple[DeploymentView, ...] = ()
    #: Times the runtime adapter moved the shares.
    reweights: int = 0
    requests_replayed: int = 0
    #: Per background re-planning, seconds until its plans were live.
    replan_live_s: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class TrainProgress:
    """One completed step of a training job."""

    job_id: str
    step: int
    last_step: int
    loss: float
    step_ms: float
    plan_epoch: int
    plan: Plan
    #: The checkpoint tag saved after this step ("" if none): pass it as ``resume_from``.
    checkpoint: str
    samples_per_s: float
    resumed_from: int


def _train_request(
    model: str,
    *,
    steps: int,
    batch: int,
    microbatches: int,
    optimizer: OptimizerName | OptimizerSpec,
    lr: float,
    momentum: float,
    weight_decay: float,
    seed: int,
    data_seed: int,
    sample_shape: tuple[int, ...] | None,
    plan: Plan | None,
    planner: str,
    qoe: QoESpec | None,
    checkpoint_every: int,
    resume_from: str,
    job_id: str,
    dataset_batches: int,
) -> coordinator_pb2.TrainRequest:
    spec = (
        optimizer
        if isinstance(optimizer, OptimizerSpec)
        else OptimizerSpec(optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    )
    req = coordinator_pb2.TrainRequest(
        model=model,
        seed=seed,
        planner=planner,
        steps=steps,
        batch=batch,
        microbatches=microbatches,
        optimizer=optimizer_to_pb(spec),
        data_seed=data_seed,
        sample_shape=list(sample_shape or ()),
        checkpoint_every=checkpoint_every,
        resume_from=resume_from,
        job_id=job_id,
        dataset_batches=dataset_batches,
    )
    if plan is not None:
        req.plan.CopyFrom(convert.plan_to_pb(plan))
    if qoe is not None:
        req.qoe.CopyFrom(convert.qoe_to_pb(qoe))
    return req


def _train_progress(pb: coordinator_pb2.TrainProgress) -> TrainProgress:
    return TrainProgress(
        job_id=pb.job_id,
        step=pb.step,
        last_step=pb.last_step,
        loss=pb.loss,
        step_ms=pb.step_ms,
        plan_epoch=pb.plan_epoch,
        plan=convert.plan_from_pb(pb.plan),
        checkpoint=pb.checkpoint,
        samples_per_s=pb.samples_per_s,
        resumed_from=pb.resumed_from,
    )


def _deployment(pb: coordinator_pb2.Deployment) -> DeploymentView:
    return DeploymentView(
        pb.model, pb.plan_epoch, convert.plan_from_pb(pb.plan), pb.status, pb.error, pb.share
    )


def _job_status(resp: coordinator_pb2.JobStatusResponse) -> JobStatus:
    return JobStatus(
        _deployment(resp.deployment),
        resp.requests_served,
        resp.requests_failed,
        resp.latency_ms_p50,
        resp.latency_ms_p95,
        tuple(_deployment(d) for d in resp.live),
        resp.reweights,
        resp.requests_replayed,
        tuple(resp.replan_live_s),
    )


def _fleet(pb: coordinator_pb2.FleetView) -> list[AgentView]:
    return [
        AgentView(convert.profile_from_pb(a.profile), a.state, a.last_seen_s, a.discovered_by)
        for a in pb.agents
    ]


def _infer_request(model: str, x: torch.Tensor, request_id: str) -> coordinator_pb2.InferRequest:
    return coordinator_pb2.InferRequest(model=model, input=tensor_to_pb(x), request_id=request_id)


def _infer_result(pb: coordinator_pb2.InferResponse) -> InferResult:
    return InferResult(
        tensor_from_pb(pb.output, max_bytes=MAX_MESSAGE_BYTES),
        pb.request_id,
        pb.plan_epoch,
        pb.latency_ms,
        pb.compute_ms,
    )


def _deploy_request(
    model: str,
    seed: int,
    qoe: QoESpec | None,
    workload: Workload | None,
    planner: str,
    plan: Plan | None = None,
    max_plans: int = 0,
    plans: Sequence[Plan] = (),
) -> coordinator_pb2.DeployRequest:
    req = coordinator_pb2.DeployRequest(
        model=model,
        seed=seed,
        planner=planner,
        max_plans=max_plans,
        plans=[convert.plan_to_pb(p) for p in plans],
    )
    if plan is not None:
        req.plan.CopyFrom(convert.plan_to_pb(plan))
    if qoe is not None:
        req.qoe.CopyFrom(convert.qoe_to_pb(qoe))
    if workload is not None:
        req.workload.CopyFrom(convert.workload_to_pb(workload))
    return req


class Client:
    """Blocking client of a coordinator."""

    def __init__(
        self,
        address: str = "127.0.0.1:7070",
        *,
        timeout: float = 60.0,
        credentials: Credentials | Unset | None = UNSET,
    ) -> None:
        """``credentials``: an app certificate or app token (``doramesh.security``); default:
        this process's (set by the CLI or a test fleet); None: plaintext (``--insecure``)."""
        self.address = address
        self.timeout = timeout
        # Only the coordinator's certificate passes: not any fleet member at that address.
        self._channel = create_sync_channel(
            address, credentials=credentials, server_name=server_name("coordinator")
        )
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def fleet(self, *, timeout: float | None = None) -> list[AgentView]:
        try:
            return _fleet(
                self._stub.Fleet(coordinator_pb2.FleetRequest(), timeout=self._t(timeout))
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def deploy(
        self,
        model: str,
        *,
        seed: int = 0,
        qoe: QoESpec | None = None,
        workload: Workload | None = None,
        planner: str = "doramesh",
        plan: Plan | None = None,
        max_plans: int = 0,
        plans: Sequence[Plan] = (),
        timeout: float | None = None,
    ) -> DeploymentView:
        """Plan and deploy ``model`` on the fleet (or deploy ``plan`` as given); with
        ``max_plans`` > 1, up to that many of the planner's plans run side by side, the runtime
        adapter sharing requests among them (``plans``: these, as given). Returns the first plan
        (``job_status`` lists all)."""
        try:
            resp = self._stub.Deploy(
                _deploy_request(model, seed, qoe, workload, planner, plan, max_plans, plans),
                timeout=self._t(timeout),
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return _deployment(resp.deployment)

    def infer_result(
        self, model: str, x: torch.Tensor, *, request_id: str = "", timeout: float | None = None
    ) -> InferResult:
        try:
            resp = self._stub.Infer(_infer_request(model, x, request_id), timeout=self._t(timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return _infer_result(resp)

    def infer(self, model: str, x: torch.Tensor, *, timeout: float | None = None) -> torch.Tensor:
        return self.infer_result(model, x, timeout=timeout).output

    def infer_many(
        self, model: str, inputs: Iterable[torch.Tensor], *, timeout: float | None = None
    ) -> Iterator[InferResult]:
        """Stream requests through the fleet, pipelined; results come back in request order."""
        requests = (_infer_request(model, x, str(i)) for i, x in enumerate(inputs))
        call = self._stub.InferStream(requests, timeout=self._t(timeout))
        try:
            for resp in call:
                yield _infer_result(resp)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            # A consumer that stops early cancels the rest: the fleet drops their work.
            call.cancel()

    def train(
        self,
        model: str,
        *,
        steps: int,
        batch: int = 8,
        microbatches: int = 1,
        optimizer: OptimizerName | OptimizerSpec = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
        data_seed: int = 0,
        sample_shape: tuple[int, ...] | None = None,
        plan: Plan | None = None,
        planner: str = "doramesh",
        qoe: QoESpec | None = None,
        checkpoint_every: int = 0,
        resume_from: str = "",
        job_id: str = "",
        dataset_batches: int = 0,
        timeout: float | None = None,
    ) -> Iterator[TrainProgress]:
        """Train ``model`` across the fleet; yields each step's progress as it completes.

        ``optimizer`` is a name (with ``lr``, ``momentum``, ``weight_decay``) or a full
        ``OptimizerSpec``. The data is synthetic, drawn from ``data_seed`` per step (or cycling
        over ``dataset_batches`` fixed batches).
        ``checkpoint_every`` saves every N steps and after the last; a progress's
        ``checkpoint`` tag given as ``resume_from`` continues from there. Stopping the iteration
        cancels the job. ``timeout`` bounds the whole job (default ``TRAIN_TIMEOUT_S``).
        """
        request = _train_request(
            model,
            steps=steps,
            batch=batch,
            microbatches=microbatches,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            seed=seed,
            data_seed=data_seed,
            sample_shape=sample_shape,
            plan=plan,
            planner=planner,
            qoe=qoe,
            checkpoint_every=checkpoint_every,
            resume_from=resume_from,
            job_id=job_id,
            dataset_batches=dataset_batches,
        )
        call = self._stub.Train(request, timeout=TRAIN_TIMEOUT_S if timeout is None else timeout)
        try:
            for resp in call:
                yield _train_progress(resp)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    def job_status(self, model: str, *, timeout: float | None = None) -> JobStatus:
        try:
            resp = self._stub.JobStatus(
                coordinator_pb2.JobStatusRequest(model=model), timeout=self._t(timeout)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return _job_status(resp)

    def set_pacing(self, enabled: bool, *, timeout: float | None = None) -> int:
        """Switch the token-bucket pacing of every live inference flow on or off, fleet-wide
        and live; returns how many senders' buckets changed."""
        try:
            resp = self._stub.SetPacing(
                coordinator_pb2.SetPacingRequest(enabled=enabled), timeout=self._t(timeout)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return int(resp.flows_changed)


class AsyncClient:
    """asyncio client of a coordinator; safe to share among tasks."""

    def __init__(
        self,
        address: str = "127.0.0.1:7070",
        *,
        timeout: float = 60.0,
        credentials: Credentials | Unset | None = UNSET,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = create_channel(
            address, credentials=credentials, server_name=server_name("coordinator")
        )
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def fleet(self, *, timeout: float | None = None) -> list[AgentView]:
        try:
            return _fleet(
                await self._stub.Fleet(coordinator_pb2.FleetRequest(), timeout=self._t(timeout))
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def deploy(
        self,
        model: str,
        *,
        seed: int = 0,
        qoe: QoESpec | None = None,
        workload: Workload | None = None,
        planner: str = "doramesh",
        plan: Plan | None = None,
        max_plans: int = 0,
        plans: Sequence[Plan] = (),
        timeout: float | None = None,
    ) -> DeploymentView:
        """Plan and deploy ``model`` on the fleet (or deploy ``plan`` as given); with
        ``max_plans`` > 1, up to that many of the planner's plans run side by side, the runtime
        adapter sharing requests among them (``plans``: these, as given). Returns the first plan
        (``job_status`` lists all)."""
        try:
            resp = await self._stub.Deploy(
                _deploy_request(model, seed, qoe, workload, planner, plan, max_plans, plans),
                timeout=self._t(timeout),
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return _deployment(resp.deployment)

    async def infer_result(
        self, model: str, x: torch.Tensor, *, request_id: str = "", timeout: float | None = None
    ) -> InferResult:
        try:
            resp = await self._stub.Infer(
                _infer_request(model, x, request_id), timeout=self._t(timeout)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return _infer_result(resp)

    async def infer(
        self, model: str, x: torch.Tensor, *, timeout: float | None = None
    ) -> torch.Tensor:
        return (await self.infer_result(model, x, timeout=timeout)).output

    async def infer_many(
        self, model: str, inputs: Iterable[torch.Tensor], *, timeout: float | None = None
    ) -> AsyncIterator[InferResult]:
        requests = (_infer_request(model, x, str(i)) for i, x in enumerate(inputs))
        call = self._stub.InferStream(requests, timeout=self._t(timeout))
        try:
            async for resp in call:
                yield _infer_result(resp)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            # A consumer that stops early cancels the rest: the fleet drops their work.
            call.cancel()

    async def train(
        self,
        model: str,
        *,
        steps: int,
        batch: int = 8,
        microbatches: int = 1,
        optimizer: OptimizerName | OptimizerSpec = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
        data_seed: int = 0,
        sample_shape: tuple[int, ...] | None = None,
        plan: Plan | None = None,
        planner: str = "doramesh",
        qoe: QoESpec | None = None,
        checkpoint_every: int = 0,
        resume_from: str = "",
        job_id: str = "",
        dataset_batches: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[TrainProgress]:
        """Train ``model`` across the fleet; yields each step's progress as it completes.

        ``optimizer`` is a name (with ``lr``, ``momentum``, ``weight_decay``) or a full
        ``OptimizerSpec``. The data is synthetic, drawn from ``data_seed`` per step (or cycling
        over ``dataset_batches`` fixed batches).
        ``checkpoint_every`` saves every N steps and after the last; a progress's
        ``checkpoint`` tag given as ``resume_from`` continues from there. Stopping the iteration
        cancels the job. ``timeout`` bounds the whole job (default ``TRAIN_TIMEOUT_S``).
        """
        request = _train_request(
            model,
            steps=steps,
            batch=batch,
            microbatches=microbatches,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            seed=seed,
            data_seed=data_seed,
            sample_shape=sample_shape,
            plan=plan,
            planner=planner,
            qoe=qoe,
            checkpoint_every=checkpoint_every,
            resume_from=resume_from,
            job_id=job_id,
            dataset_batches=dataset_batches,
        )
        call = self._stub.Train(request, timeout=TRAIN_TIMEOUT_S if timeout is None else timeout)
        try:
            async for resp in call:
                yield _train_progress(resp)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def job_status(self, model: str, *, timeout: float | None = None) -> JobStatus:
        try:
            resp = await self._stub.JobStatus(
                coordinator_pb2.JobStatusRequest(model=model), timeout=self._t(timeout)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return _job_status(resp)

    async def set_pacing(self, enabled: bool, *, timeout: float | None = None) -> int:
        """See ``Client.set_pacing``."""
        try:
            resp = await self._stub.SetPacing(
                coordinator_pb2.SetPacingRequest(enabled=enabled), timeout=self._t(timeout)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return int(resp.flows_changed)
