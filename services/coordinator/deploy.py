"""Deployment: ask the planner for a plan over the live fleet, load its stages on the agents,
and keep what inference needs (the entry link, the plan epoch, latency statistics)."""

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
from doramesh.errors import DoraMeshError, FailedPrecondition, InvalidArgument, error_for
from doramesh.streams import PeerLink, StageResult
from doramesh.types import Network, Plan, QoESpec, Workload
from doramesh.v1 import agent_pb2, agent_pb2_grpc, planner_pb2, planner_pb2_grpc

_log = structlog.get_logger("coordinator.deploy")

DeploymentStatus = Literal["deploying", "ready", "failed"]


@dataclass(slots=True)
class Deployment:
    model: str
    seed: int
    plan_epoch: int
    plan: Plan
    stage_ids: list[str]
    addresses: list[str]
    status: DeploymentStatus = "deploying"
    error: str = ""
    entry: PeerLink | None = None
    served: int = 0
    failed: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1024))

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
        self._epochs = itertools.count(int(time.time()))
        self._lock = asyncio.Lock()
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
        timeout_s: float = DEFAULT_RPC_TIMEOUT_S * 4,
    ) -> Deployment:
        models.require_served(model)  # NotFound before any work for an unknown model
        qoe = qoe or QoESpec(objective="max_throughput")
        workload = workload or Workload()
        async with self._lock:
            plan = await self.plan(model, qoe, workload, planner, timeout_s)
            epoch = next(self._epochs)
            for stage in plan.stages:
                if len(stage.devices) != 1:
                    raise FailedPrecondition(
                        "data-parallel stage groups are not executed yet; got a stage with "
                        f"{len(stage.devices)} devices"
                    )
            stage_ids = [f"{model}@{epoch}/s{i}" for i in range(len(plan.stages))]
            addresses = [self.registry.address(s.devices[0].id) for s in plan.stages]
            dep = Deployment(model, seed, epoch, plan, stage_ids, addresses)
            try:
                # Last stage first, so every stage's next hop is loaded before traffic can flow.
                for i in reversed(range(len(plan.stages))):
                    await self._load(dep, i, timeout_s)
            except DoraMeshError as err:
                dep.status, dep.error = "failed", err.message
                await self._unload(dep)
                raise
            dep.entry = PeerLink(addresses[0])
            dep.status = "ready"
            old = self.deployments.get(model)
            self.deployments[model] = dep
            if old is not None:
                await self._retire(old)
        _log.info(
            "deployed",
            model=model,
            plan_epoch=epoch,
            stages=[[s.first, s.last, s.devices[0].id] for s in plan.stages],
        )
        return dep

    async def _load(self, dep: Deployment, i: int, timeout_s: float) -> None:
        stage = dep.plan.stages[i]
        _, digest = await self.weights.get(StageKey(dep.model, dep.seed, stage.first, stage.last))
        last = i == len(dep.plan.stages) - 1
        flow = next((f for f in dep.plan.flows if not last and f.src == stage.devices[0].id), None)
        request = agent_pb2.LoadStageRequest(
            stage_id=dep.stage_ids[i],
            plan_epoch=dep.plan_epoch,
            model=dep.model,
            seed=dep.seed,
            first=stage.first,
            last=stage.last,
            weights_digest=digest,
            weights_source=self.weights_source,
            next_address="" if last else dep.addresses[i + 1],
            next_stage_id="" if last else dep.stage_ids[i + 1],
            rate_mbps=flow.rate_mbps if flow else 0.0,
            burst_kb=flow.burst_kb if flow else 0.0,
        )
        stub = agent_pb2_grpc.AgentStub(self._channel(dep.addresses[i]))
        try:
            await stub.LoadStage(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise error_for(
                err.code(), f"loading stage {i} on {stage.devices[0].id}: {err.details()}"
            ) from err

    async def _unload(self, dep: Deployment) -> None:
        for stage_id, address in zip(dep.stage_ids, dep.addresses, strict=True):
            stub = agent_pb2_grpc.AgentStub(self._channel(address))
            try:
                await stub.UnloadStage(agent_pb2.UnloadStageRequest(stage_id=stage_id), timeout=5)
            except grpc.aio.AioRpcError:
                pass  # a dead agent holds nothing worth freeing

    async def _retire(self, dep: Deployment) -> None:
        if dep.entry is not None:
            await dep.entry.close()
        await self._unload(dep)

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
        dep = self.get(model)
        self.check_input(model, x)
        assert dep.entry is not None
        start = time.perf_counter()
        try:
            result = await dep.entry.send(
                x,
                stage_id=dep.stage_ids[0],
                plan_epoch=dep.plan_epoch,
                request_id=request_id,
                timeout=timeout_s,
            )
        except TimeoutError as err:
            dep.failed += 1
            from doramesh.errors import DeadlineExceeded

            raise DeadlineExceeded(f"no result within {timeout_s:.1f} s") from err
        except DoraMeshError:
            dep.failed += 1
            raise
        latency_ms = (time.perf_counter() - start) * 1e3
        dep.served += 1
        dep.latencies_ms.append(latency_ms)
        return result, dep, latency_ms

    async def close(self) -> None:
        for dep in list(self.deployments.values()):
            if dep.entry is not None:
                await dep.entry.close()
        for channel in self._agent_channels.values():
            await channel.close()
        if self._planner_channel is not None:
            await self._planner_channel.close()
