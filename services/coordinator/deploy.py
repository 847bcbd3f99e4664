"""Deployment: ask the planner for a plan over the live fleet, load its stages on the agents,
and keep what inference needs (the entry link, the plan epoch, latency statistics).

A training job deploys its own stages (``deploy_training``): the same plan checks and loading,
with each replica told its optimizer, its rank and its stage's replica group, and entered
through training links. Those stages belong to the job, not to the model's serving deployment,
and are unloaded when the job ends.

Pacing is fleet-wide: when plans of several models are live at once they share the medium, so
the deployer runs the network scheduler over all of them together (``netsched.schedule_jobs``,
each plan with its own model's layer table, workload and QoE, each device at its measured
speed) and re-sets the senders' token buckets live; a model alone keeps the buckets its plan
set came with. ``set_pacing(False)`` lifts every bucket (TCP alone shares the medium) and
``set_pacing(True)`` puts them back. Training jobs keep the buckets they were loaded with (the
agents re-pace inference flows only) and are not part of the joint schedule."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import grpc.aio
import structlog
import torch

from doramesh import convert, models
from doramesh.channels import DEFAULT_RPC_TIMEOUT_S, acting_as, create_channel
from doramesh.coordinator import adapter
from doramesh.coordinator.mix import LiveSet, PlanStats, Reweight
from doramesh.coordinator.registry import FleetRegistry
from doramesh.coordinator.weights import StageKey, WeightStore
from doramesh.errors import (
    Aborted,
    DeadlineExceeded,
    DoraMeshError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    error_for,
)
from doramesh.planner import netsched
from doramesh.security.credentials import CURRENT_CREDENTIALS
from doramesh.streams import PeerLink, Replica, StageResult, fan_out
from doramesh.training import OptimizerSpec, TrainLink, TrainReplica, optimizer_to_pb
from doramesh.types import (
    DeviceProfile,
    LayerTable,
    Network,
    NodeId,
    Plan,
    PlanSet,
    QoESpec,
    Workload,
)
from doramesh.v1 import agent_pb2, agent_pb2_grpc, planner_pb2, planner_pb2_grpc

_log = structlog.get_logger("coordinator.deploy")

DeploymentStatus = Literal["deploying", "ready", "failed"]

#: Times one request may be replayed on a new plan after agents on its path failed.
MAX_REPLAYS = 3
#: Shortest deadline of the probe that tells a dead agent from a broken stream; it is never
#: shorter than the registry's ``dead_after_s`` either (a busy agent answers late, and only
#: silence for that long is death: a 1 s probe dropped a plan deployed as given on a loaded box).
LIVENESS_PROBE_S = 1.0
#: Plans of one model live at once (each holds its stages' weights on its agents).
MAX_LIVE_PLANS = 8
#: How often the adapter polls the agents of live plans for their measured speed.
ADAPT_POLL_S = 0.1
#: Deadline of one stats poll (a busy in-process agent may answer late; that is not death).
STATS_TIMEOUT_S = 0.5
#: How long a retired plan's in-flight requests may take to finish before its stages go.
DRAIN_S = 5.0
#: Least time between two re-plannings asked because re-weighting could not meet the QoE.
QOE_REPLAN_COOLDOWN_S = 30.0
#: Deadline of the cancel sent to each agent of a plan when a request is given up.
CANCEL_TIMEOUT_S = 1.0


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
    #: The plan as the fleet-wide network scheduler priced it beside the other models' live
    #: plans (its flows are the buckets in force); None while the model is alone.
    paced: Plan | None = None

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
        max_plans: int = 1,
        pacing: bool = True,
    ) -> None:
        self.registry = registry
        #: The coordinator's identity, as it is where the deployer is made: channels opened
        #: later (from a background task, an in-process caller) still present it.
        self._credentials = CURRENT_CREDENTIALS.get()
        self.weights = weights
        self.planner_address = planner_address
        self.network = network
        self.weights_source = weights_source
        self.deployments: dict[str, Deployment] = {}
        #: Training jobs' deployments, by job id, while they run.
        self.trainings: dict[str, Deployment] = {}
        self._epochs = itertools.count(int(time.time()))
        #: Called once a Deploy's plans are live, with what was asked (the plans as given, or
        #: None when planned): a coordinator that persists its jobs records it here.
        self.on_deployed: Callable[[LiveSet, Sequence[Plan] | None], None] | None = None
        self._lock = asyncio.Lock()
        self._recovering: dict[str, asyncio.Lock] = {}
        self._planner_channel: grpc.aio.Channel | None = None
        self._agent_channels: dict[str, grpc.aio.Channel] = {}
        #: Each served model's live plans and their shares (``deployments`` keeps the first).
        self.live: dict[str, LiveSet] = {}
        #: Plans per model asked of the planner when a Deploy names no number.
        self.max_plans = max_plans
        self._background: set[asyncio.Task[Any]] = set()
        self._adapter_task: asyncio.Task[None] | None = None
        self._replanning: set[str] = set()
        #: Why the last re-planning of a model failed (cleared when plans are installed).
        self._replan_errors: dict[str, str] = {}
        self._changed = asyncio.Event()
        #: Per device, the computations counted at the last stats poll.
        self._computations: dict[NodeId, int] = {}
        #: Whether senders' token buckets are in force (``set_pacing``).
        self.pacing = pacing
        #: Per (sender address, stage id, next stage id): the (rate Mbit/s, burst kB) last set.
        self._buckets: dict[tuple[str, str, str], tuple[float, float]] = {}
        self._pace_lock = asyncio.Lock()

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._agent_channels.get(address)
        if channel is None:
            with acting_as(self._credentials):
                channel = self._agent_channels[address] = create_channel(address)
        return channel

    async def plan(
        self, model: str, qoe: QoESpec, workload: Workload, planner: str, timeout_s: float
    ) -> Plan:
        """The best single plan (training runs one plan)."""
        plan_set, _ = await self.plan_set(model, qoe, workload, planner, timeout_s, max_plans=1)
        return plan_set.plans[0]

    async def plan_set(
        self,
        model: str,
        qoe: QoESpec,
        workload: Workload,
        planner: str,
        timeout_s: float,
        *,
        max_plans: int,
        devices: Sequence[DeviceProfile] | None = None,
    ) -> tuple[PlanSet, LayerTable]:
        """Ask the planner for up to ``max_plans`` plans over ``devices`` (default: the live
        fleet as profiled)."""
        table = await asyncio.to_thread(models.layer_table, model)
        devices = list(self.registry.alive() if devices is None else devices)
        if not devices:
            raise FailedPrecondition("no live agents in the fleet to plan on")
        if self._planner_channel is None:
            with acting_as(self._credentials):
                self._planner_channel = create_channel(self.planner_address)
        stub = planner_pb2_grpc.PlannerStub(self._planner_channel)
        request = planner_pb2.PlanRequest(
            devices=[convert.profile_to_pb(d) for d in devices],
            network=convert.network_to_pb(self.network),
            model=convert.layer_table_to_pb(table),
            workload=convert.workload_to_pb(workload),
            qoe=convert.qoe_to_pb(qoe),
            planner=planner,
            max_plans=max_plans,
        )
        try:
            response = await stub.Plan(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise error_for(err.code(), f"planner: {err.details()}") from err
        plan_set = convert.plan_set_from_pb(response.plan_set)
        if not plan_set.plans:
            raise FailedPrecondition("the planner returned no plan")
        return plan_set, table

    async def deploy(
        self,
        model: str,
        *,
        seed: int = 0,
        qoe: QoESpec | None = None,
        workload: Workload | None = None,
        planner: str = "doramesh",
        plan: Plan | None = None,
        plans: Sequence[Plan] | None = None,
        max_plans: int = 0,
        timeout_s: float = DEFAULT_RPC_TIMEOUT_S * 4,
    ) -> Deployment:
        """Plan (or take ``plan``, or ``plans``, as given, checked) and load the stages of up
        to ``max_plans`` plans (0: the coordinator's default), which then serve side by side;
        the model's previous plans are retired only once the new ones are ready. Returns the
        first plan."""
        models.require_served(model)  # NotFound before any work for an unknown model
        given = list(plans) if plans else ([plan] if plan is not None else None)
        if given is not None and len(given) > MAX_LIVE_PLANS:
            raise InvalidArgument(f"at most {MAX_LIVE_PLANS} plans live at once, got {len(given)}")
        if given is not None:
            max_plans = len(given)
        qoe = qoe or QoESpec(objective="max_throughput")
        workload = workload or Workload()
        async with self._lock:
            live = await self._load_set(
                model,
                seed,
                qoe,
                workload,
                planner,
                given,
                min(max_plans or self.max_plans, MAX_LIVE_PLANS),
                timeout_s,
            )
            old = self.live.get(model)
            if old is not None:
                live.reweights.extendleft(reversed(old.reweights))
                live.replan_live_s = old.replan_live_s
                live.replayed = old.replayed
            self._install(live)
            if old is not None:
                await self._retire_set(old)
        await self.repace()
        self._start_adapter()
        if self.on_deployed is not None:
            self.on_deployed(live, given)
        return live.primary

    def _install(self, live: LiveSet) -> None:
        self.live[live.model] = live
        self.deployments[live.model] = live.primary
        self._replan_errors.pop(live.model, None)
        self._signal()

    def _signal(self) -> None:
        """Wake the requests waiting for a model's plans to come back."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _load_set(
        self,
        model: str,
        seed: int,
        qoe: QoESpec,
        workload: Workload,
        planner: str,
        plans: list[Plan] | None,
        max_plans: int,
        timeout_s: float,
        *,
        devices: Sequence[DeviceProfile] | None = None,
    ) -> LiveSet:
        """Load every plan of a plan set (the first must load; another that does not fit is
        left out) and weigh them with the adapter."""
        given = plans is not None
        if plans is None:
            plan_set, table = await self.plan_set(
                model, qoe, workload, planner, timeout_s, max_plans=max_plans, devices=devices
            )
            plans = list(plan_set.plans[:max_plans])
        else:
            table = await asyncio.to_thread(models.layer_table, model)
        live = LiveSet(model, seed, qoe, workload, planner, max_plans, given=given)
        for i, plan in enumerate(plans):
            try:
                dep = await self._load_plan(
                    model, seed, qoe, workload, planner, plan, timeout_s, train=None
                )
            except DoraMeshError as err:
                if i == 0:
                    for loaded in live.plans.values():
                        await self._retire(loaded)
                    raise
                _log.warning("plan left out of the set", model=model, error=err.message)
                continue
            dep.entry = [Replica(PeerLink(r.address), r.stage_id, r.share) for r in dep.replicas[0]]
            dep.status = "ready"
            live.add(dep, self._plan_load(dep, table))
            _log.info(
                "deployed",
                model=model,
                plan_epoch=dep.plan_epoch,
                stages=[[s.first, s.last, [d.id for d in s.devices]] for s in dep.plan.stages],
            )
        live.reweight(self._alive(), "deployed", force=True)
        _log.info("plan shares", model=model, shares=live.shares)
        return live

    def _plan_load(self, dep: Deployment, table: LayerTable) -> adapter.PlanLoad:
        """A plan as the adapter sees it: each device's busy seconds per sample at its
        profiled speed, and the plan's predicted capacity, latency and energy."""
        seconds: dict[NodeId, float] = {}
        for stage in dep.plan.stages:
            gflops = sum(table.layers[i].gflops for i in stage.layers)
            for d in stage.devices:
                record = self.registry.agents.get(d.id)
                speed = record.profile.gflops if record is not None else 0.0
                if speed > 0:
                    seconds[d.id] = seconds.get(d.id, 0.0) + d.share * gflops / speed
        predicted = dep.plan.predicted
        capacity = predicted.throughput_sps
        if capacity <= 0:
            capacity = 1.0 / max(seconds.values(), default=1.0)
        return adapter.PlanLoad(
            key=dep.plan_epoch,
            device_seconds=seconds,
            capacity_sps=capacity,
            latency_ms=predicted.latency_ms,
            energy_j_per_sample=predicted.energy_j_per_sample,
        )

    def _alive(self) -> frozenset[NodeId]:
        """Agents that may keep their plans: all but the dead (a suspect agent, late on one
        health check while busy, keeps its load until it is declared dead)."""
        return frozenset(n for n, r in self.registry.agents.items() if r.state != "dead")

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

    def epochs_after(self, epoch: int) -> None:
        """Issue plan epochs above ``epoch`` from now on (a restarted coordinator's agents may
        hold stages of epochs its clock-based counter has not passed yet)."""
        self._epochs = itertools.count(max(next(self._epochs), epoch + 1))

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
        modes = {d.id: d.mode for d in stage.devices}
        for rank, replica in enumerate(dep.replicas[i]):
            hops = [
                agent_pb2.NextHop(
                    address=n.address,
                    stage_id=n.stage_id,
                    share=n.share,
                    rate_mbps=flow.rate_mbps if flow and self.pacing else 0.0,
                    burst_kb=flow.burst_kb if flow and self.pacing else 0.0,
                )
                for n in nxt
                for flow in [flows.get((replica.device, n.device))]
            ]
            for hop in hops:
                key = (replica.address, replica.stage_id, hop.stage_id)
                self._buckets[key] = (hop.rate_mbps, hop.burst_kb)
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
                power_mode=modes.get(replica.device, ""),
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

    async def _retire(self, dep: Deployment, drain: PlanStats | None = None) -> None:
        """Close a plan's entry links and unload its stages, after its in-flight requests
        finished (at most ``DRAIN_S``; later ones are refused as old-epoch traffic and
        replayed by their callers)."""
        if drain is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain.idle.wait(), DRAIN_S)
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

    def live_set(self, model: str) -> LiveSet:
        models.require_served(model)
        live = self.live.get(model)
        if live is None or not live.plans:
            raise FailedPrecondition(f"model {model!r} is not deployed; call Deploy first")
        return live

    async def infer(
        self, model: str, x: torch.Tensor, *, request_id: str, timeout_s: float
    ) -> tuple[StageResult, Deployment, float]:
        """Run one request on the model's live plans: with several plans, a request larger than
        a microbatch is cut into microbatches, each sent to the plan the adapter's shares pick,
        and the answers joined in order. Returns the result, the plan of its first microbatch
        and the latency.

        If an agent on a microbatch's path fails (its stream breaks) or the plan was retired
        meanwhile (its agents refuse the old epoch), that microbatch is replayed on another
        live plan (a new one when none is left): inference is idempotent, and the caller gets
        exactly one result per request because only this call delivers it. A caller that goes
        away (cancelled, deadline) has its microbatches dropped on the agents too.
        """
        self.check_input(model, x)
        start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        live = self.live.get(model)
        size = x.shape[0]
        if live is not None and len(live.plans) > 1:
            size = max(1, min(d.plan.microbatch for d in live.plans.values()))
        if x.shape[0] <= size:
            result, dep = await self._microbatch(model, x, request_id, deadline, timeout_s)
        else:
            tasks = [
                asyncio.ensure_future(
                    self._microbatch(model, part.contiguous(), request_id, deadline, timeout_s)
                )
                for part in torch.split(x, size)
            ]
            try:
                outs = await asyncio.gather(*tasks)
            except BaseException:
                # One microbatch failed for good (or the caller left): drop the others too.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            result = StageResult(
                torch.cat([r.tensor for r, _ in outs]), max(r.compute_ms for r, _ in outs)
            )
            dep = outs[0][1]
        return result, dep, (time.perf_counter() - start) * 1e3

    async def _microbatch(
        self, model: str, x: torch.Tensor, request_id: str, deadline: float, timeout_s: float
    ) -> tuple[StageResult, Deployment]:
        """One microbatch on the plan the shares pick, replayed on another after a failure."""
        # The fleet sees its own id per microbatch: callers' ids (stream positions) repeat.
        fleet_id = uuid.uuid4().hex
        failed_on: set[int] = set()
        for attempt in range(MAX_REPLAYS + 1):
            pending = self.live.get(model)
            if pending is not None and not pending.plans:
                await self._await_recovery(model, deadline - time.monotonic())
            live = self.live_set(model)
            dep = live.pick(exclude=failed_on if len(failed_on) < len(live.plans) else set())
            remaining = deadline - time.monotonic()
            start = time.perf_counter()
            live.started(dep)
            ok = False
            try:
                result = await fan_out(
                    dep.entry,
                    x,
                    plan_epoch=dep.plan_epoch,
                    request_id=fleet_id,
                    timeout=max(remaining, 0.0),
                )
                ok = True
            except TimeoutError as err:
                dep.failed += 1
                self._cancel_in_fleet(dep, fleet_id)
                raise DeadlineExceeded(f"no result within {timeout_s:.1f} s") from err
            except asyncio.CancelledError:
                self._cancel_in_fleet(dep, fleet_id)
                raise
            # A peer that dies mid-stream surfaces as UNAVAILABLE, or as INTERNAL when gRPC's
            # core sees the connection torn mid-message; a retired epoch as FAILED_PRECONDITION.
            except (Unavailable, Aborted, FailedPrecondition, Internal) as err:
                if attempt == MAX_REPLAYS or deadline - time.monotonic() <= 0:
                    dep.failed += 1
                    raise
                dep.replayed += 1
                live.replayed += 1
                failed_on.add(dep.plan_epoch)
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
            finally:
                latency_ms = (time.perf_counter() - start) * 1e3
                live.finished(dep, latency_ms if ok else None)
            dep.served += 1
            dep.latencies_ms.append(latency_ms)
            return result, dep
        raise AssertionError("unreachable")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _cancel_in_fleet(self, dep: Deployment, fleet_id: str) -> None:
        """Tell every agent of ``dep`` to drop the request's microbatches (in the background:
        the caller that gave up is not kept waiting)."""

        async def cancel() -> None:
            addresses = {r.address for stage in dep.replicas for r in stage}
            calls = [
                self.agent_stub(a).CancelRequest(
                    agent_pb2.CancelRequestRequest(request_id=fleet_id), timeout=CANCEL_TIMEOUT_S
                )
                for a in addresses
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            dropped = sum(r.dropped for r in results if not isinstance(r, BaseException))
            _log.info("request cancelled in the fleet", plan_epoch=dep.plan_epoch, dropped=dropped)

        self._spawn(cancel())

    async def recover(self, failed: Deployment, timeout_s: float) -> None:
        """After a failure on ``failed``: find the agents that stopped answering, mark them
        dead, drop every live plan that used them and re-weight the rest at once; re-plan in
        the background (or now, when no plan is left). Concurrent failures recover once."""
        lock = self._recovering.setdefault(failed.model, asyncio.Lock())
        async with lock:
            live = self.live.get(failed.model)
            if live is None or failed.plan_epoch not in live.plans:
                return  # an old epoch, or another request already dropped the plan
            devices = sorted(set(failed.plan.device_ids))
            answers = await asyncio.gather(*(self._answers(d) for d in devices))
            dead = [d for d, ok in zip(devices, answers, strict=True) if not ok]
            for node_id in dead:
                self.registry.mark_dead(node_id, time.monotonic())
            if not dead:
                return  # a transient break: the link reopens on the next send
            trigger = time.monotonic()
            self._drop_dead(live, f"agents {dead} died")
            if live.plans:
                self._replan_soon(failed.model, trigger, f"agents {dead} died")
                return
            # No plan left: requests wait (on this lock) for the new plans.
            _log.warning("re-planning without dead agents", model=failed.model, dead=dead)
            try:
                await self.replan(failed.model, trigger, f"agents {dead} died", timeout_s=timeout_s)
            except DoraMeshError as err:
                self._replan_errors[failed.model] = err.message
                raise
            finally:
                self._signal()

    async def _await_recovery(self, model: str, timeout_s: float) -> None:
        """Wait, within the caller's deadline, for new plans of a model that lost every plan
        (asking for them if no re-planning is under way)."""
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.live.get(model)
            if live is None or live.plans:
                return
            lock = self._recovering.get(model)
            busy = model in self._replanning or (lock is not None and lock.locked())
            if not busy:
                error = self._replan_errors.get(model)
                if error is not None:
                    raise FailedPrecondition(
                        f"every plan of {model!r} lost its agents and re-planning failed "
                        f"({error}); call Deploy"
                    )
                self._replan_soon(model, time.monotonic(), "no live plan left")
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), max(deadline - time.monotonic(), 0.0))
            except TimeoutError as err:
                raise DeadlineExceeded(f"no plan of {model!r} came back in time") from err

    def _drop_dead(self, live: LiveSet, reason: str) -> None:
        """Remove the plans that use a device no longer alive; re-weight the others at once."""
        alive = self._alive()
        gone = [
            k for k, dep in live.plans.items() if any(d not in alive for d in dep.plan.device_ids)
        ]
        if not gone:
            return
        for key in gone:
            dep = live.remove(key)
            if dep is not None:
                self._spawn(self._retire(dep))
        if live.plans:
            live.reweight(alive, reason, force=True)
            self.deployments[live.model] = live.primary
        _log.warning("plans dropped", model=live.model, epochs=gone, shares=live.shares)
        self._spawn(self.repace())

    def _replan_soon(self, model: str, trigger: float, reason: str) -> None:
        if model in self._replanning:
            return
        self._replanning.add(model)

        async def run() -> None:
            try:
                await self.replan(model, trigger, reason)
            except DoraMeshError as err:
                self._replan_errors[model] = err.message
                _log.warning("background re-planning failed", model=model, error=err.message)
            finally:
                self._replanning.discard(model)
                self._signal()

        self._spawn(run())

    async def replan(
        self,
        model: str,
        trigger: float,
        reason: str,
        *,
        timeout_s: float = DEFAULT_RPC_TIMEOUT_S * 4,
    ) -> LiveSet | None:
        """Ask the planner for a new plan set over the live fleet (each device's profile at
        its measured speed), load it as new plan epochs beside the running ones, then switch
        to it and retire the old plans once their requests have drained: the job never stops.
        Records the time from ``trigger`` until the new plans were live."""
        async with self._lock:
            old = self.live.get(model)
            if old is None:
                return None
            slowdown = old.slowdown()
            devices = [
                replace(p, gflops=p.gflops / slowdown.get(p.node_id, 1.0))
                for p in self.registry.alive()
            ]
            live = await self._load_set(
                model,
                old.seed,
                old.qoe,
                old.workload,
                old.planner,
                None,
                old.max_plans,
                max(timeout_s, 1.0),
                devices=devices,
            )
            live.speed = old.speed
            live.reweights.extendleft(reversed(old.reweights))
            live.replans = old.replans + 1
            live.replayed = old.replayed
            live.qoe_replan_at = old.qoe_replan_at
            live.replan_live_s = old.replan_live_s
            live.replan_live_s.append(time.monotonic() - trigger)
            live.reweights.append(
                Reweight(time.monotonic(), f"{reason}: new plans live", dict(live.shares), 0, 0)
            )
            self._install(live)
            _log.info(
                "new plans live",
                model=model,
                epochs=list(live.plans),
                shares=live.shares,
                seconds=round(live.replan_live_s[-1], 3),
            )
        await self._retire_set(old)
        await self.repace()
        return live

    async def _retire_set(self, live: LiveSet) -> None:
        for key in list(live.plans):
            dep = live.remove(key)
            if dep is not None:
                await self._retire(dep, drain=live.stats.get(key))

    # -- the adapter loop -----------------------------------------------------------------------

    def _start_adapter(self) -> None:
        if self._adapter_task is None or self._adapter_task.done():
            self._adapter_task = asyncio.ensure_future(self._adapt_forever())

    async def _adapt_forever(self) -> None:
        # The LP solver's import takes seconds: pay it now, not at the first event.
        await asyncio.to_thread(importlib.import_module, "cvxpy")
        while True:
            try:
                await self.adapt_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive one bad poll
                _log.exception("adapter poll failed")
            await asyncio.sleep(ADAPT_POLL_S)

    async def adapt_once(self) -> None:
        """One adapter round: poll each live plan's agents for their measured speed, feed the
        hysteresis, drop plans whose agents died, re-weight where something changed."""
        lives = [live for live in self.live.values() if live.plans]
        devices = sorted(
            {d for live in lives for dep in live.plans.values() for d in dep.plan.device_ids}
        )
        polls = await asyncio.gather(*(self._poll(d) for d in devices))
        changed: set[NodeId] = set()
        for node_id, factor in zip(devices, polls, strict=True):
            if factor is None:
                continue
            for live in lives:
                if any(node_id in dep.plan.device_ids for dep in live.plans.values()):
                    tracker = live.speed.setdefault(node_id, adapter.Hysteresis(1.0))
                    if tracker.observe(factor):
                        changed.add(node_id)
                        _log.info(
                            "device speed changed", node_id=node_id, slowdown=round(factor, 2)
                        )
        if changed and len(lives) > 1:
            await self.repace()  # the joint schedule prices each device at its measured speed
        alive = self._alive()
        for live in lives:
            dead = {d for dep in live.plans.values() for d in dep.plan.device_ids} - alive
            if dead:
                trigger = time.monotonic()
                self._drop_dead(live, f"agents {sorted(dead)} died")
                self._replan_soon(live.model, trigger, f"agents {sorted(dead)} died")
                continue
            latencies = tuple(
                (k, s.latency.accepted if s.latency is not None else None)
                for k, s in live.stats.items()
            )
            touched = any(d in changed for dep in live.plans.values() for d in dep.plan.device_ids)
            if touched or (live.qoe.latency_ms and latencies != live.solved_latencies):
                live.solved_latencies = latencies
                before = dict(live.shares)
                live.reweight(alive, "measurements changed")
                if live.shares != before:
                    _log.info("re-weighted", model=live.model, shares=live.shares)
                self._replan_if_qoe_missed(live, alive)

    def _replan_if_qoe_missed(self, live: LiveSet, alive: frozenset[NodeId]) -> None:
        """Re-weighting first; a re-plan only when the shares cannot meet the job's QoE any
        more (its throughput floor, or no plan within its latency SLO), at most once per
        ``QOE_REPLAN_COOLDOWN_S``. Plans the client gave are kept: it chose them."""
        now = time.monotonic()
        if live.given or now - live.qoe_replan_at < QOE_REPLAN_COOLDOWN_S:
            return
        inp = live.adapter_input(alive)
        reason = ""
        floor = live.qoe.min_throughput_sps
        if floor and adapter.throughput_of(live.shares, inp) < floor:
            reason = f"throughput under the QoE floor of {floor:g} samples/s"
        slo = live.qoe.latency_ms
        if slo and all(inp.latency_ms.get(k, 0.0) > slo for k in live.plans):
            reason = f"no plan within the latency SLO of {slo:g} ms"
        if reason:
            live.qoe_replan_at = now
            self._replan_soon(live.model, now, reason)

    async def _poll(self, node_id: NodeId) -> float | None:
        """The device's new speed factor since the last poll (None: nothing new). An agent
        that refuses connections is dead at once; a slow answer is not."""
        record = self.registry.agents.get(node_id)
        if record is None or record.state == "dead":
            return None
        try:
            stats = await self.agent_stub(record.profile.address).GetStats(
                agent_pb2.GetStatsRequest(), timeout=STATS_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self.registry.mark_dead(node_id, time.monotonic())
            return None
        last = self._computations.get(node_id, 0)
        self._computations[node_id] = stats.computations
        if stats.computations <= last or stats.seconds_per_gflop <= 0:
            return None
        return float(stats.seconds_per_gflop * record.profile.gflops)

    # -- live pacing --------------------------------------------------------------------------

    async def set_pacing(self, enabled: bool) -> int:
        """Switch every live inference flow's token bucket on (the scheduler's rates) or off
        (unpaced), live; plans loaded later follow. Returns the buckets re-set."""
        self.pacing = enabled
        _log.info("pacing switched", enabled=enabled)
        return await self.repace()

    def _joint_schedule(self) -> None:
        """Price every live plan of every model together (``Deployment.paced``), when more than
        one model has live plans; each device at the speed the adapter last accepted for it."""
        lives = [live for live in self.live.values() if live.plans]
        known = {r.profile.node_id: r.profile for r in self.registry.agents.values()}
        together = [
            live
            for live in lives
            if all(d in known for dep in live.plans.values() for d in dep.plan.device_ids)
        ]
        for live in lives:
            for dep in live.plans.values():
                dep.paced = None
        if len(together) < 2:
            return
        slowdown: dict[NodeId, float] = {}
        for live in together:
            for node_id, factor in live.slowdown().items():
                slowdown[node_id] = max(slowdown.get(node_id, 0.0), factor)
        devices = [
            replace(p, gflops=p.gflops / slowdown.get(n, 1.0)) if slowdown.get(n, 1.0) > 0 else p
            for n, p in known.items()
        ]
        jobs = [
            netsched.Job(
                tuple(dep.plan for dep in live.plans.values()),
                models.layer_table(live.model),
                live.workload,
                live.qoe,
            )
            for live in together
        ]
        for live, plans in zip(
            together, netsched.schedule_jobs(jobs, devices, self.network), strict=True
        ):
            for dep, plan in zip(live.plans.values(), plans, strict=True):
                dep.paced = plan

    async def repace(self) -> int:
        """Bring every sender's token bucket in line with the joint schedule (or lift them all
        when pacing is off); only buckets that change are re-set. Returns how many were."""
        async with self._pace_lock:
            for model in self.live:
                await asyncio.to_thread(models.layer_table, model)  # cached after the first
            self._joint_schedule()
            want: dict[tuple[str, str, str], tuple[float, float]] = {}
            for live in self.live.values():
                for dep in live.plans.values():
                    plan = dep.paced or dep.plan
                    flows = {(f.src, f.dst): f for f in plan.flows}
                    for here, nxt in itertools.pairwise(dep.replicas):
                        for a in here:
                            for b in nxt:
                                flow = flows.get((a.device, b.device))
                                bucket = (0.0, 0.0)
                                if flow is not None and self.pacing:
                                    bucket = (flow.rate_mbps, flow.burst_kb)
                                want[(a.address, a.stage_id, b.stage_id)] = bucket
            changes = {k: v for k, v in want.items() if self._buckets.get(k) != v}
            done = await asyncio.gather(*(self._set_bucket(k, v) for k, v in changes.items()))
            failed = {k for k, ok in zip(changes, done, strict=True) if not ok}
            self._buckets = {k: v for k, v in want.items() if k not in failed}
            if changes:
                _log.info("flows re-paced", pacing=self.pacing, flows=sum(done))
            return sum(done)

    async def _set_bucket(self, key: tuple[str, str, str], bucket: tuple[float, float]) -> bool:
        address, stage_id, next_stage_id = key
        try:
            await self.agent_stub(address).SetFlowRate(
                agent_pb2.SetFlowRateRequest(
                    stage_id=stage_id,
                    next_stage_id=next_stage_id,
                    rate_mbps=bucket[0],
                    burst_kb=bucket[1],
                ),
                timeout=DEFAULT_RPC_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            # A dead agent or a stage retired meanwhile: the next re-pacing tries again.
            _log.warning("could not re-pace a flow", stage_id=stage_id, error=err.details())
            return False
        return True

    async def set_flow_rate(
        self,
        model: str,
        src: NodeId,
        dst: NodeId,
        rate_mbps: float,
        burst_kb: float,
        *,
        timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
    ) -> int:
        """Re-pace every flow from ``src`` to ``dst`` in the model's live plans, live (the
        sender's token bucket takes the new rate and burst at its next chunk); returns the
        number of flows changed."""
        live = self.live_set(model)
        changed = 0
        for dep in live.plans.values():
            for i in range(len(dep.replicas) - 1):
                for a in dep.replicas[i]:
                    if a.device != src:
                        continue
                    for b in dep.replicas[i + 1]:
                        if b.device != dst:
                            continue
                        try:
                            await self.agent_stub(a.address).SetFlowRate(
                                agent_pb2.SetFlowRateRequest(
                                    stage_id=a.stage_id,
                                    next_stage_id=b.stage_id,
                                    rate_mbps=rate_mbps,
                                    burst_kb=burst_kb,
                                ),
                                timeout=timeout_s,
                            )
                        except grpc.aio.AioRpcError as err:
                            raise error_for(
                                err.code(), f"setting flow {src}->{dst}: {err.details()}"
                            ) from err
                        changed += 1
        if not changed:
            raise NotFound(f"no flow from {src!r} to {dst!r} in the live plans of {model!r}")
        return changed

    async def _answers(self, node_id: NodeId) -> bool:
        try:
            address = self.registry.address(node_id)
        except KeyError:
            return False
        stub = agent_pb2_grpc.AgentStub(self._channel(address))
        try:
            await stub.GetProfile(
                agent_pb2.GetProfileRequest(),
                timeout=max(LIVENESS_PROBE_S, self.registry.dead_after_s),
            )
        except grpc.aio.AioRpcError:
            return False
        return True

    async def close(self) -> None:
        if self._adapter_task is not None:
            self._adapter_task.cancel()
        for task in list(self._background):
            task.cancel()
        for live in self.live.values():
            for dep in live.plans.values():
                for replica in dep.entry:
                    await replica.link.close()
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
