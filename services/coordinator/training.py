"""Training jobs: the coordinator's side of forward, backward, gradient sync and optimizer steps.

A job deploys the model's stages for training (``Deployer.deploy_training``), then runs its
steps one after the other (the schedule and why it is exact: ``doramesh.training``). Per step:

1. draw the step's synthetic batch (inputs and labels) from ``(data_seed, step)``;
2. cut it into microbatches and send them all into the pipeline at once; each comes back, after
   its backward pass has run on every stage, with its share of the loss;
3. ask every replica of every stage to end the step (``Agent.TrainStep``): the replicas of a
   stage sum their gradients over gRPC, then all apply the same optimizer step;
4. report the step (loss, step time, plan) and, every ``checkpoint_every`` steps and after the
   last, have every replica save its stage (``Agent.SaveCheckpoint``).

A job that loses an agent fails with the agent's error; its last checkpoint is where it resumes
(``resume_from``), continuing the same loss curve: the checkpoint holds the weights and the
optimizer state, and the data of step s depends only on ``(data_seed, s)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import grpc.aio
import structlog
import torch
from google.protobuf.message import Message

from doramesh import models
from doramesh.coordinator.deploy import Deployer, Deployment, TrainSetup
from doramesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    error_for,
)
from doramesh.models.zoo import check_sample_shape
from doramesh.streams import split_by_shares
from doramesh.training import (
    MAX_LABEL_BYTES,
    OptimizerSpec,
    SyntheticData,
    TrainPart,
    train_fan_out,
)
from doramesh.types import Plan, QoESpec, Workload
from doramesh.v1 import agent_pb2

_log = structlog.get_logger("coordinator.training")

#: Bounds on a job, so one request cannot ask for unbounded work or memory.
MAX_STEPS = 1_000_000
MAX_BATCH = 1 << 16
MAX_MICROBATCHES = 256
#: Checkpoints the coordinator remembers (their plans, for resuming without one).
MAX_CHECKPOINT_RECORDS = 256
#: A job's deadline when its caller set none.
DEFAULT_TRAIN_TIMEOUT_S = 6 * 3600.0
_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class TrainJob:
    """A training request, as domain values."""

    model: str
    steps: int
    batch: int = 8
    microbatches: int = 1
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    seed: int = 0
    data_seed: int = 0
    sample_shape: tuple[int, ...] | None = None
    plan: Plan | None = None
    planner: str = "doramesh"
    qoe: QoESpec | None = None
    checkpoint_every: int = 0
    resume_from: str = ""
    job_id: str = ""
    dataset_batches: int = 0

    def check(self) -> TrainJob:
        """This job with a job id, or ``InvalidArgument`` naming the field that is wrong."""
        if not self.model:
            raise InvalidArgument("model is required")
        models.require_served(self.model)
        if not 1 <= self.steps <= MAX_STEPS:
            raise InvalidArgument(f"steps must be in [1, {MAX_STEPS}], got {self.steps}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise InvalidArgument(f"batch must be in [1, {MAX_BATCH}], got {self.batch}")
        if not 1 <= self.microbatches <= min(self.batch, MAX_MICROBATCHES):
            raise InvalidArgument(
                f"microbatches must be in [1, min(batch, {MAX_MICROBATCHES})], "
                f"got {self.microbatches} for batch {self.batch}"
            )
        if self.checkpoint_every < 0:
            raise InvalidArgument("checkpoint_every must be >= 0")
        if self.dataset_batches < 0:
            raise InvalidArgument("dataset_batches must be >= 0")
        self.optimizer.check()
        check_sample_shape(models.get_spec(self.model), self.sample_shape)
        if self.resume_from and not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", self.resume_from):
            raise InvalidArgument(f"resume_from {self.resume_from!r} is not a checkpoint tag")
        job_id = self.job_id or uuid.uuid4().hex[:12]
        if not _JOB_ID.match(job_id):
            raise InvalidArgument(f"job_id {job_id!r} must match [A-Za-z0-9_.-]{{1,64}}")
        return dataclasses.replace(self, job_id=job_id)


@dataclass(frozen=True, slots=True)
class StepReport:
    """One completed step of a job."""

    job_id: str
    step: int
    last_step: int
    loss: float
    step_ms: float
    plan_epoch: int
    plan: Plan
    checkpoint: str
    samples_per_s: float
    resumed_from: int


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A checkpoint the fleet holds: every replica saved its stage under ``tag``."""

    tag: str
    job_id: str
    model: str
    step: int
    plan: Plan


class TrainingJobs:
    """Runs training jobs over the deployer's fleet and remembers their checkpoints."""

    def __init__(self, deployer: Deployer) -> None:
        self.deployer = deployer
        self.checkpoints: OrderedDict[str, CheckpointRecord] = OrderedDict()

    async def run(self, job: TrainJob, *, timeout_s: float) -> AsyncGenerator[StepReport, None]:
        """Deploy, run ``job.steps`` steps, yield a report after each; the job's stages are
        unloaded when it ends, fails or its caller goes away (use ``contextlib.aclosing``).

        Resuming without a plan reuses the plan the checkpoint was taken on, which this
        coordinator remembers; after a coordinator restart, pass that plan (or let the planner
        choose, and an agent without the checkpoint of its stage refuses with NotFound).
        """
        job = job.check()
        deadline = time.monotonic() + timeout_s
        # Before any stage is loaded: a model whose output is not logits fails here, cheaply.
        data = await asyncio.to_thread(
            functools.partial(
                SyntheticData.for_model,
                job.model,
                job.data_seed,
                job.batch,
                job.sample_shape,
                distinct_batches=job.dataset_batches,
            )
        )
        largest = -(-job.batch // job.microbatches)
        label_bytes = largest * (data.sample_shape[0] if data.tokens else 1) * 8
        if label_bytes > MAX_LABEL_BYTES:
            raise InvalidArgument(
                f"a microbatch's labels would take {label_bytes} bytes, over the "
                f"{MAX_LABEL_BYTES}-byte limit of a header: use more microbatches"
            )
        plan = job.plan
        if job.resume_from and plan is None:
            record = self.checkpoints.get(job.resume_from)
            if record is not None:
                if record.model != job.model:
                    raise FailedPrecondition(
                        f"checkpoint {job.resume_from!r} is of {record.model}, not {job.model}"
                    )
                plan = record.plan  # the agents that hold the checkpoint's stages
        dep, start = await self.deployer.deploy_training(
            job.model,
            TrainSetup(job.job_id, job.optimizer, job.resume_from),
            seed=job.seed,
            qoe=job.qoe,
            workload=Workload(kind="training", batch=job.batch),
            planner=job.planner,
            plan=plan,
            timeout_s=max(deadline - time.monotonic(), 0.0),
        )
        if job.resume_from and start == 0:
            await self.deployer.retire_training(dep)
            raise FailedPrecondition(f"checkpoint {job.resume_from!r} is of step 0")
        last = start + job.steps
        _log.info(
            "training",
            job_id=job.job_id,
            model=job.model,
            steps=[start + 1, last],
            batch=job.batch,
            microbatches=job.microbatches,
            optimizer=job.optimizer.name,
            plan_epoch=dep.plan_epoch,
        )
        try:
            for step in range(start + 1, last + 1):
                began = time.perf_counter()
                x, y = await asyncio.to_thread(data.step, step)
                loss = await self._step(dep, job, step, x, y, deadline)
                seconds = time.perf_counter() - began
                tag = ""
                if job.checkpoint_every and (step % job.checkpoint_every == 0 or step == last):
                    tag = f"{job.job_id}-step{step}"
                    await self._checkpoint(dep, job, tag, step, deadline)
                _log.info("train step", job_id=job.job_id, step=step, loss=loss, ms=seconds * 1e3)
                yield StepReport(
                    job_id=job.job_id,
                    step=step,
                    last_step=last,
                    loss=loss,
                    step_ms=seconds * 1e3,
                    plan_epoch=dep.plan_epoch,
                    plan=dep.plan,
                    checkpoint=tag,
                    samples_per_s=job.batch / seconds if seconds > 0 else 0.0,
                    resumed_from=start,
                )
        finally:
            await self.deployer.retire_training(dep)

    async def _step(
        self,
        dep: Deployment,
        job: TrainJob,
        step: int,
        x: torch.Tensor,
        y: torch.Tensor,
        deadline: float,
    ) -> float:
        """One step: every microbatch forward and backward (all in flight at once), then every
        replica's TrainStep; returns the step's full-batch mean loss."""
        counts = split_by_shares(job.batch, [1.0] * job.microbatches)
        loss_scale = 1.0 / y.numel()
        sends = [
            train_fan_out(
                dep.train_entry,
                xm.contiguous(),
                TrainPart(job.job_id, step, m, 0, loss_scale, ym.contiguous()),
                plan_epoch=dep.plan_epoch,
                timeout=_remaining(deadline),
            )
            for m, (xm, ym) in enumerate(
                zip(torch.split(x, counts), torch.split(y, counts), strict=True)
            )
            if counts[m] > 0
        ]
        try:
            results = await asyncio.gather(*sends)
        except TimeoutError as err:
            raise DeadlineExceeded(f"step {step} did not finish before the job's deadline") from err
        loss = 0.0
        for r in results:
            loss += r.loss
        await self._on_every_replica(
            dep,
            "TrainStep",
            lambda stage_id: agent_pb2.TrainStepRequest(
                stage_id=stage_id, plan_epoch=dep.plan_epoch, step=step
            ),
            deadline,
        )
        return loss

    async def _checkpoint(
        self, dep: Deployment, job: TrainJob, tag: str, step: int, deadline: float
    ) -> None:
        await self._on_every_replica(
            dep,
            "SaveCheckpoint",
            lambda stage_id: agent_pb2.SaveCheckpointRequest(
                stage_id=stage_id, plan_epoch=dep.plan_epoch, tag=tag, step=step
            ),
            deadline,
        )
        self.checkpoints[tag] = CheckpointRecord(tag, job.job_id, job.model, step, dep.plan)
        self.checkpoints.move_to_end(tag)
        while len(self.checkpoints) > MAX_CHECKPOINT_RECORDS:
            self.checkpoints.popitem(last=False)

    async def _on_every_replica(
        self,
        dep: Deployment,
        method: str,
        make: Callable[[str], Message],
        deadline: float,
    ) -> None:
        """Call ``method`` on every replica of every stage at once, each with its own request."""

        async def call(address: str, stage_id: str, device: str) -> None:
            rpc = getattr(self.deployer.agent_stub(address), method)
            try:
                await rpc(make(stage_id), timeout=_remaining(deadline))
            except grpc.aio.AioRpcError as err:
                raise error_for(err.code(), f"{method} on {device}: {err.details()}") from err

        await asyncio.gather(
            *(call(r.address, r.stage_id, r.device) for stage in dep.replicas for r in stage)
        )


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("the training job ran past its deadline")
    return remaining
