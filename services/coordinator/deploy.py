"""Deployment: ask the planner for a plan over the live fleet, load its stages on the agents,
and keep what inference needs (the entry link, the plan epoch, latency statistics).

A training job deploys its own stages (``deploy_training``): the same plan checks and loading,
with each replica told its optimizer, its rank and its stage's replica group, and entered
through training links. Those stages belong to the job, not to the model's serving deployment,
and are unloaded when the job ends."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import grpc.aio
import structlog
import torch

from doramesh import convert, models
from doramesh.channels import DEFAULT_RPC_TIMEOUT_S, create_channel
from doramesh.coordinator.registry import FleetRegistry
from doramesh.coordinator.weights import StageKey, WeightStore
from doramesh.errors import (
    Aborted,
    DeadlineExceeded,
    DoraMeshError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    error_for,
)
from doramesh.streams import PeerLink, Replica, StageResult, fan_out
from doramesh.training import OptimizerSpec, TrainLink, TrainReplica, optimizer_to_pb
from doramesh.types import Network, NodeId, Plan, QoESpec, Workload
from doramesh.v1 import agent_pb2, agent_pb2_grpc, planner_pb2, planner_pb2_grpc

_log = structlog.get_logger("coordinator.deploy")

DeploymentStatus = Literal["deploying", "ready", "failed"]

#: Times one request may be replayed on a new plan after agents on its path failed.
MAX_REPLAYS = 3
#: Deadline of the probe that tells a dead agent from a broken stream.
LIVENESS_PROBE_S = 1.0


@dataclass(frozen=True, slots=True)
class ReplicaRef:
    """Where one replica of one stage of a deployment lives."""

    stage_id: str
    device: NodeId
    address: str
    share: float


@dataclass(frozen=True, slots=True)
class TrainSetup:
    """What every stage of a training deployment is told: whose job, which optimizer, and the
    checkpoint to start from ("" = the seeded weights)."""

    job_id: str
    optimizer: OptimizerSpec
    resume_tag: str = ""


@dataclass(slots=True)
class Deployment:
    model: str
    seed: int
    plan_epoch: int
    plan: Plan
    #: Per stage, its replicas.
    replicas: list[list[ReplicaRef]]
    status: DeploymentStatus = "deploying"
    error: str = ""
    qoe: QoESpec = field(default_factory=QoESpec)
    workload: Workload = field(default_factory=Workload)
    planner: str = "doramesh"
    entry: list[Replica] = field(default_factory=list)
    served: int = 0
    failed: int = 0
    #: Requests that failed on this deployment's agents and were replayed on a new plan.
    replayed: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1024))
    #: Set on a training job's deployment.
    train: TrainSetup | None = None
    train_entry: list[TrainReplica] = field(default_factory=list)
    #: Per replica stage id, the step its checkpoint was taken at (0 when not resumed).
    resumed_steps: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(q * (len(data) - 1) + 0.5))]


class Deployer:
    def __init__(
        self,
        *,
        registry: FleetRegistry,
        weights: WeightStore,
        planner_address: str,
        network: Network,
        weights_source: str,
    ) -> None:
        self.registry = registry
        self.weights = weights
        self.planner_address = planner_address
        self.network = network
        self.weights_source = weights_source
        self.deployments: dict[str, Deployment] = {}
        #: Training jobs' deployments, by job id, while they run.
        self.trainings: dict[str, Deployment] = {}
        self._epochs = itertools.count(int(time.time()))
        self._lock = asyncio.Lock()
        self._recovering: dict[str, asyncio.Lock] = {}
        self._planner_channel: grpc.aio.Channel | None = None
        self._agent_channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._agent_channels.get(address)
        if channel is None:
            channel = self._agent_channels[address] = create_channel(address)
        return channel

    async def plan(
        self, model: str, qoe: QoESpec, workload: Workload, planner: str, timeout_s: float
    ) -> Plan:
        table = await asyncio.to_thread(models.layer_table, model)
        devices = self.registry.alive()
        if not devices:
            raise FailedPrecondition("no live agents in the fleet to plan on")
        if self._planner_channel is None:
            self._planner_channel = create_channel(self.planner_address)
        stub = planner_pb2_grpc.PlannerStub(self._planner_channel)
        request = planner_pb2.PlanRequest(
            devices=[convert.profile_to_pb(d) for d in devices],
            network=convert.network_to_pb(self.network),
            model=convert.layer_table_to_pb(table),
            workload=convert.workload_to_pb(workload),
            qoe=convert.qoe_to_pb(qoe),
            planner=planner,
            # The coordinator runs one plan per model for now, so it asks for the best single
            # plan: the first plan of a larger set is chosen to leave devices to the others.
            max_plans=1,
        )
        try:
            response = await stub.Plan(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise error_for(err.code(), f"planner: {err.details()}") from err
        plan_set = convert.plan_set_from_pb(response.plan_set)
        if not plan_set.plans:
            raise FailedPrecondition("the planner returned no plan")
        return plan_set.plans[0]

    async def deploy(
        self,
        model: str,
        *,
        seed: int = 0,
        qoe: QoESpec | None = None,
        workload: Workload | None = None,
        planner: str = "doramesh",
        plan: Plan | None = None,
        timeout_s: float = DEFAULT_RPC_TIMEOUT_S * 4,
    ) -> Deployment:
        """Plan (or take ``plan`` as given, checked) and load the stages; the previous
        deployment of the model is retired only once the new one is ready."""
        models.require_served(model)  # NotFound before any work for an unknown model
        qoe = qoe or QoESpec(objective="max_throughput")
        workload = workload or Workload()
        async with self._lock:
            dep = await self._load_plan(
                model, seed, qoe, workload, planner, plan, timeout_s, train=None
            )
            dep.entry = [Replica(PeerLink(r.address), r.stage_id, r.share) for r in dep.replicas[0]]
            dep.status = "ready"
            old = self.deployments.get(model)
            self.deployments[model] = dep
            if old is not None:
                await self._retire(old)
        _log.info(
            "deployed",
            model=model,
            plan_epoch=dep.plan_epoch,
            stages=[[s.first, s.last, [d.id for d in s.devices]] for s in dep.plan.stages],
        )
        return dep

    async def _load_plan(
        self,
        model: str,
        seed: int,
        qoe: QoESpec,
        workload: Workload,
        planner: str,
        plan: Plan | None,
        timeout_s: float,
        *,
        train: TrainSetup | None,
    ) -> Deployment:
        """Plan (or check ``plan``), then load every stage; unloads what it loaded on failure."""
        if plan is None:
            plan = await self.plan(model, qoe, workload, planner, timeout_s)
        else:
            self.check_plan(model, plan)
        epoch = next(self._epochs)
        prefix = f"{model}@{epoch}" if train is None else f"{model}@{epoch}/{train.job_id}"
        replicas = [
            [
                ReplicaRef(f"{prefix}/s{i}r{k}", d.id, self.registry.address(d.id), d.share)
                for k, d in enumerate(stage.devices)
                if d.share > 0
            ]
            for i, stage in enumerate(plan.stages)
        ]
        dep = Deployment(
            model,
            seed,
            epoch,
            plan,
            replicas,
            qoe=qoe,
            workload=workload,
            planner=planner,
            train=train,
        )
        try:
            # Last stage first, so every stage's next hop is loaded before traffic can flow.
            for i in reversed(range(len(plan.stages))):
                await self._load(dep, i, timeout_s)
        except (DoraMeshError, asyncio.CancelledError) as err:
            # A caller that went away (a cancelled Train) must not leave stages loaded either.
            dep.status = "failed"
            dep.error = err.message if isinstance(err, DoraMeshError) else "cancelled"
            await self._unload(dep)
            raise
        return dep

    async def deploy_training(
        self,
        model: str,
        train: TrainSetup,
        *,
        seed: int = 0,
        qoe: QoESpec | None = None,
        workload: Workload | None = None,
        planner: str = "doramesh",
        plan: Plan | None = None,
        timeout_s: float = DEFAULT_RPC_TIMEOUT_S * 4,
    ) -> tuple[Deployment, int]:
        """Load ``model``'s stages for training job ``train.job_id``; returns the deployment and
        the step it starts after (the checkpoint's step when resuming, else 0)."""
        models.require_served(model)
        if train.job_id in self.trainings:
            raise FailedPrecondition(f"training job {train.job_id!r} is already running")
        qoe = qoe or QoESpec(objective="max_throughput")
        workload = workload or Workload(kind="training")
        async with self._lock:
            dep = await self._load_plan(
                model, seed, qoe, workload, planner, plan, timeout_s, train=train
            )
        steps = set(dep.resumed_steps.values())
        if len(steps) != 1:
            await self._unload(dep)
            raise FailedPrecondition(
                f"checkpoint {train.resume_tag!r} holds different steps on different stages: "
                f"{dict(sorted(dep.resumed_steps.items()))}"
            )
        (resumed,) = steps
        dep.train_entry = [
            TrainReplica(TrainLink(r.address), r.stage_id, r.share) for r in dep.replicas[0]
        ]
        dep.status = "ready"
        self.trainings[train.job_id] = dep
        _log.info(
            "deployed for training",
            model=model,
            job_id=train.job_id,
            plan_epoch=dep.plan_epoch,
            resumed_step=resumed,
            stages=[[s.first, s.last, [d.id for d in s.devices]] for s in dep.plan.stages],
        )
        return dep, resumed

    async def retire_training(self, dep: Deployment) -> None:
        """Close a training job's links and unload its stages (its checkpoints stay on disk)."""
        if dep.train is not None:
            self.trainings.pop(dep.train.job_id, None)
        for replica in dep.train_entry:
            await replica.link.close()
        await self._unload(dep)

    def agent_stub(self, address: str) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self._channel(address))

    async def _load(self, dep: Deployment, i: int, timeout_s: float) -> None:
        """Load every replica of stage ``i``, each pointing at all replicas of stage i+1."""
        stage = dep.plan.stages[i]
        _, digest = await self.weights.get(StageKey(dep.model, dep.seed, stage.first, stage.last))
        nxt = dep.replicas[i + 1] if i + 1 < len(dep.replicas) else []
        flows = {(f.src, f.dst): f for f in dep.plan.flows}
        group = [
            agent_pb2.ReplicaPeer(address=r.address, stage_id=r.stage_id) for r in dep.replicas[i]
        ]
        for rank, replica in enumerate(dep.replicas[i]):
            hops = [
                agent_pb2.NextHop(
                    address=n.address,
                    stage_id=n.stage_id,
                    share=n.share,
                    rate_mbps=flow.rate_mbps if flow else 0.0,
                    burst_kb=flow.burst_kb if flow else 0.0,
                )
                for n in nxt
                for flow in [flows.get((replica.device, n.device))]
            ]
            request = agent_pb2.LoadStageRequest(
                stage_id=replica.stage_id,
                plan_epoch=dep.plan_epoch,
                model=dep.model,
                seed=dep.seed,
                first=stage.first,
                last=stage.last,
                weights_digest=digest,
                weights_source=self.weights_source,
                next=hops,
            )
            if dep.train is not None:
                request.train.CopyFrom(
                    agent_pb2.TrainSpec(
                        job_id=dep.train.job_id,
                        optimizer=optimizer_to_pb(dep.train.optimizer),
                        resume_tag=dep.train.resume_tag,
                        rank=rank,
                        group=group,
                    )
                )
            stub = agent_pb2_grpc.AgentStub(self._channel(replica.address))
            try:
                response = await stub.LoadStage(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                raise error_for(
                    err.code(), f"loading stage {i} on {replica.device}: {err.details()}"
                ) from err
            if dep.train is not None:
                dep.resumed_steps[replica.stage_id] = response.resumed_step

    async def _unload(self, dep: Deployment) -> None:
        for r in (r for stage in dep.replicas for r in stage):
            stub = agent_pb2_grpc.AgentStub(self._channel(r.address))
            try:
                await stub.UnloadStage(agent_pb2.UnloadStageRequest(stage_id=r.stage_id), timeout=5)
            except grpc.aio.AioRpcError:
                pass  # a dead agent holds nothing worth freeing

    async def _retire(self, dep: Deployment) -> None:
        for replica in dep.entry:
            await replica.link.close()
        await self._unload(dep)

    def check_plan(self, model: str, plan: Plan) -> None:
        """A plan given by a client: contiguous stages over every layer, live agents, shares."""
        n_layers = models.get_spec(model).num_blocks
        expected = 0
        if not plan.stages:
            raise InvalidArgument("plan has no stages")
        alive = {p.node_id for p in self.registry.alive()}
        for i, stage in enumerate(plan.stages):
            if stage.first != expected or stage.last < stage.first:
                raise InvalidArgument(
                    f"plan.stages[{i}]: layers [{stage.first}, {stage.last}] do not continue "
                    f"at layer {expected}"
                )
            expected = stage.last + 1
            if not stage.devices:
                raise InvalidArgument(f"plan.stages[{i}] has no devices")
            for device in stage.devices:
                if device.id not in alive:
                    raise FailedPrecondition(f"plan.stages[{i}]: agent {device.id!r} is not alive")
                if not device.share > 0:
                    raise InvalidArgument(f"plan.stages[{i}]: share of {device.id} must be > 0")
            if abs(sum(d.share for d in stage.devices) - 1.0) > 1e-6:
                raise InvalidArgument(f"plan.stages[{i}]: shares must sum to 1")
        if expected != n_layers:
            raise InvalidArgument(
                f"plan covers layers up to {expected - 1}; {model} has {n_layers}"
            )

    def get(self, model: str) -> Deployment:
        models.require_served(model)
        dep = self.deployments.get(model)
        if dep is None or dep.status != "ready":
            raise FailedPrecondition(f"model {model!r} is not deployed; call Deploy first")
        return dep

    def check_input(self, model: str, x: torch.Tensor) -> None:
        spec = models.get_spec(model)
        if x.dtype != spec.input_dtype:
            raise InvalidArgument(
                f"{model} takes {spec.input_dtype} input, got {x.dtype}".replace("torch.", "")
            )
        if x.dim() != len(spec.sample_shape) + 1:
            raise InvalidArgument(
                f"{model} takes input of shape [batch, {', '.join(map(str, spec.sample_shape))}]"
                f", got {list(x.shape)}"
            )
        if x.shape[0] < 1:
            raise InvalidArgument("batch must be at least 1")

    async def infer(
        self, model: str, x: torch.Tensor, *, request_id: str, timeout_s: float
    ) -> tuple[StageResult, Deployment, float]:
        """Run one request through the model's deployment.

        If an agent on the path fails (its stream breaks), the request is replayed on a new
        plan over the agents still alive: inference is idempotent, and the caller gets exactly
        one result per request because only this call delivers it.
        """
        self.check_input(model, x)
        start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        for attempt in range(MAX_REPLAYS + 1):
            dep = self.get(model)
            remaining = deadline - time.monotonic()
            try:
                result = await fan_out(
                    dep.entry,
                    x,
                    plan_epoch=dep.plan_epoch,
                    request_id=request_id,
                    timeout=max(remaining, 0.0),
                )
            except TimeoutError as err:
                dep.failed += 1
                raise DeadlineExceeded(f"no result within {timeout_s:.1f} s") from err
            except (Unavailable, Aborted) as err:
                if attempt == MAX_REPLAYS or deadline - time.monotonic() <= 0:
                    dep.failed += 1
                    raise
                dep.replayed += 1
                _log.warning(
                    "request failed on the fleet; replaying",
                    request_id=request_id,
                    plan_epoch=dep.plan_epoch,
                    error=err.message,
                )
                await self.recover(dep, deadline - time.monotonic())
                continue
            except DoraMeshError:
                dep.failed += 1
                raise
            latency_ms = (time.perf_counter() - start) * 1e3
            dep.served += 1
            dep.latencies_ms.append(latency_ms)
            return result, dep, latency_ms
        raise AssertionError("unreachable")

    async def recover(self, failed: Deployment, timeout_s: float) -> None:
        """After a failure on ``failed``: find the agents that stopped answering, mark them
        dead, and re-plan the model over the rest. Concurrent failures recover once."""
        lock = self._recovering.setdefault(failed.model, asyncio.Lock())
        async with lock:
            if self.deployments.get(failed.model) is not failed:
                return  # another request already moved the model to a new plan
            devices = {d.id for s in failed.plan.stages for d in s.devices}
            answers = await asyncio.gather(*(self._answers(d) for d in devices))
            dead = [d for d, ok in zip(devices, answers, strict=True) if not ok]
            for node_id in dead:
                self.registry.mark_dead(node_id, time.monotonic())
            if not dead:
                return  # a transient break: the link reopens on the next send
            _log.warning("re-planning without dead agents", model=failed.model, dead=dead)
            await self.deploy(
                failed.model,
                seed=failed.seed,
                qoe=failed.qoe,
                workload=failed.workload,
                planner=failed.planner,
                timeout_s=max(timeout_s, 1.0),
            )

    async def _answers(self, node_id: NodeId) -> bool:
        try:
            address = self.registry.address(node_id)
        except KeyError:
            return False
        stub = agent_pb2_grpc.AgentStub(self._channel(address))
        try:
            await stub.GetProfile(agent_pb2.GetProfileRequest(), timeout=LIVENESS_PROBE_S)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def close(self) -> None:
        for dep in list(self.deployments.values()):
            for replica in dep.entry:
                await replica.link.close()
        for dep in list(self.trainings.values()):
            for train_replica in dep.train_entry:
                await train_replica.link.close()
        for channel in self._agent_channels.values():
            await channel.close()
        if self._planner_channel is not None:
            await self._planner_channel.close()
