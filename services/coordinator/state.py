"""What a coordinator keeps across a restart (SIGKILL included), and how it restores it.

The coordinator holds no job state that the fleet cannot rebuild except what it was *asked*:
the deployments (model, seed, QoE, workload, planner name or the explicit plans) and the
training jobs (model, hyper-parameters, last checkpoint tag and step, and each checkpoint's
plan, so ``resume_from`` finds the agents holding it). That goes to one JSON file in the state
dir, rewritten whole and atomically (a temporary file, fsync, ``os.replace``) after every change;
nothing is pickled. Plans, QoE specs, workloads and optimizers are written as their protobuf
JSON, the same contract the wire uses.

On start (``CoordinatorPersistence.restore``) the coordinator rebuilds the fleet from the
agents' own reports (mDNS and the static list, as always), waits a bounded time for the agents
it last knew, unloads the stages the previous incarnation left on them (so their traffic is
refused by epoch like any retired plan's), then re-deploys every recorded deployment under
fresh plan epochs (above any epoch the agents report). Until then the client API answers
UNAVAILABLE ("restoring"), which the SDK raises as ``Unavailable``: a retry after the restore
succeeds. Training is driven by its caller's ``Train`` stream, which the restart breaks; the
caller resumes with ``train(resume_from=<last checkpoint>)`` and, because the checkpoint's plan
was persisted, the job continues on the agents holding it, on the same loss curve.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
import structlog
from google.protobuf import json_format
from google.protobuf.message import Message

from doramesh import convert
from doramesh.coordinator.training import (
    MAX_CHECKPOINT_RECORDS,
    CheckpointRecord,
    StepReport,
    TrainingJobs,
    TrainJob,
)
from doramesh.errors import DoraMeshError
from doramesh.security.interceptor import _guard
from doramesh.training import OptimizerSpec, optimizer_from_pb, optimizer_to_pb
from doramesh.types import NodeId, Plan, QoESpec, Workload
from doramesh.v1 import agent_pb2, common_pb2

if TYPE_CHECKING:
    from doramesh.coordinator.deploy import Deployer
    from doramesh.coordinator.mix import LiveSet
    from doramesh.coordinator.registry import FleetRegistry

_log = structlog.get_logger("coordinator.state")

STATE_FILE = "coordinator-jobs.json"
FORMAT = 1
#: Bounds on what is persisted (and restored): one request cannot grow the file without end.
MAX_DEPLOYMENT_RECORDS = 64
MAX_TRAINING_RECORDS = 256
MAX_AGENT_RECORDS = 1024
#: The state file is read only up to this size; a bigger one is refused, not parsed.
MAX_STATE_BYTES = 16 << 20
#: Client-API calls refused with UNAVAILABLE while the coordinator restores its jobs.
GATED_METHODS = frozenset(
    f"/doramesh.v1.Coordinator/{m}"
    for m in ("Deploy", "Infer", "InferStream", "Train", "JobStatus")
)
#: Deadline of one agent call made while restoring (stats, unloading an orphaned stage).
RESTORE_RPC_S = 5.0


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    """A Deploy the coordinator was asked for; ``plans`` empty = planned by ``planner``."""

    model: str
    seed: int
    qoe: QoESpec
    workload: Workload
    planner: str
    max_plans: int
    plans: tuple[Plan, ...] = ()


@dataclass(frozen=True, slots=True)
class TrainingRecord:
    """A training job: what it was asked, and where it can resume from."""

    job_id: str
    model: str
    last_step: int
    batch: int
    microbatches: int
    optimizer: OptimizerSpec
    seed: int
    data_seed: int
    sample_shape: tuple[int, ...] | None
    planner: str
    checkpoint_every: int
    dataset_batches: int
    #: The last checkpoint tag the fleet holds ("" = none yet) and its step.
    checkpoint: str = ""
    step: int = 0
    finished: bool = False


@dataclass(slots=True)
class CoordinatorState:
    fleet_id: str = ""
    #: Agents alive when the state was last written: the fleet a restart waits for.
    agents: list[NodeId] = field(default_factory=list)
    deployments: OrderedDict[str, DeploymentRecord] = field(default_factory=OrderedDict)
    trainings: OrderedDict[str, TrainingRecord] = field(default_factory=OrderedDict)
    checkpoints: OrderedDict[str, CheckpointRecord] = field(default_factory=OrderedDict)


# -- JSON, through the wire's own messages -----------------------------------------------------


def _msg(pb: Message) -> dict[str, Any]:
    return json_format.MessageToDict(pb, preserving_proto_field_name=True)


_M = TypeVar("_M", bound=Message)


def _parse(data: Any, into: _M) -> _M:
    return json_format.ParseDict(data, into)


def state_to_json(state: CoordinatorState) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "fleet_id": state.fleet_id,
        "agents": list(state.agents),
        "deployments": [
            {
                "model": d.model,
                "seed": d.seed,
                "qoe": _msg(convert.qoe_to_pb(d.qoe)),
                "workload": _msg(convert.workload_to_pb(d.workload)),
                "planner": d.planner,
                "max_plans": d.max_plans,
                "plans": [_msg(convert.plan_to_pb(p)) for p in d.plans],
            }
            for d in state.deployments.values()
        ],
        "trainings": [
            {
                "job_id": t.job_id,
                "model": t.model,
                "last_step": t.last_step,
                "batch": t.batch,
                "microbatches": t.microbatches,
                "optimizer": _msg(optimizer_to_pb(t.optimizer)),
                "seed": t.seed,
                "data_seed": t.data_seed,
                "sample_shape": list(t.sample_shape) if t.sample_shape else None,
                "planner": t.planner,
                "checkpoint_every": t.checkpoint_every,
                "dataset_batches": t.dataset_batches,
                "checkpoint": t.checkpoint,
                "step": t.step,
                "finished": t.finished,
            }
            for t in state.trainings.values()
        ],
        "checkpoints": [
            {
                "tag": c.tag,
                "job_id": c.job_id,
                "model": c.model,
                "step": c.step,
                "plan": _msg(convert.plan_to_pb(c.plan)),
            }
            for c in state.checkpoints.values()
        ],
    }


def state_from_json(data: Any) -> CoordinatorState:
    """The state a file holds; ``ValueError`` (naming what is wrong) for anything else."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a doramesh coordinator state of format {FORMAT}")
    try:
        state = CoordinatorState(
            fleet_id=str(data.get("fleet_id", "")),
            agents=[NodeId(str(a)) for a in data.get("agents", [])[:MAX_AGENT_RECORDS]],
        )
        for d in data.get("deployments", [])[-MAX_DEPLOYMENT_RECORDS:]:
            state.deployments[str(d["model"])] = DeploymentRecord(
                model=str(d["model"]),
                seed=int(d["seed"]),
                qoe=convert.qoe_from_pb(_parse(d["qoe"], common_pb2.QoESpec())),
                workload=convert.workload_from_pb(_parse(d["workload"], common_pb2.Workload())),
                planner=str(d["planner"]),
                max_plans=int(d["max_plans"]),
                plans=tuple(convert.plan_from_pb(_parse(p, common_pb2.Plan())) for p in d["plans"]),
            )
        for t in data.get("trainings", [])[-MAX_TRAINING_RECORDS:]:
            shape = t.get("sample_shape")
            state.trainings[str(t["job_id"])] = TrainingRecord(
                job_id=str(t["job_id"]),
                model=str(t["model"]),
                last_step=int(t["last_step"]),
                batch=int(t["batch"]),
                microbatches=int(t["microbatches"]),
                optimizer=optimizer_from_pb(_parse(t["optimizer"], agent_pb2.OptimizerSpec())),
                seed=int(t["seed"]),
                data_seed=int(t["data_seed"]),
                sample_shape=tuple(int(s) for s in shape) if shape else None,
                planner=str(t["planner"]),
                checkpoint_every=int(t["checkpoint_every"]),
                dataset_batches=int(t["dataset_batches"]),
                checkpoint=str(t["checkpoint"]),
                step=int(t["step"]),
                finished=bool(t["finished"]),
            )
        for c in data.get("checkpoints", [])[-MAX_CHECKPOINT_RECORDS:]:
            state.checkpoints[str(c["tag"])] = CheckpointRecord(
                tag=str(c["tag"]),
                job_id=str(c["job_id"]),
                model=str(c["model"]),
                step=int(c["step"]),
                plan=convert.plan_from_pb(_parse(c["plan"], common_pb2.Plan())),
            )
    except (KeyError, TypeError, ValueError, json_format.ParseError, DoraMeshError) as err:
        raise ValueError(f"coordinator state is malformed: {err}") from err
    return state


def _import_solver() -> None:
    with contextlib.suppress(ImportError):
        importlib.import_module("cvxpy")


class StateFile:
    """One JSON file, replaced atomically: a reader (a restarted coordinator) sees either the
    previous state or the new one, never a torn write."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE

    def load(self) -> CoordinatorState | None:
        """The saved state, None when there is none; a corrupt file is set aside, not trusted."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return None
        try:
            if size > MAX_STATE_BYTES:
                raise ValueError(f"{size} bytes, over the {MAX_STATE_BYTES}-byte limit")
            return state_from_json(json.loads(self.path.read_text(encoding="utf-8")))
        except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError included
            aside = self.path.with_suffix(f".corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            _log.error(
                "coordinator state unreadable; starting empty", path=str(aside), error=str(err)
            )
            return None

    def save(self, state: CoordinatorState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = json.dumps(state_to_json(state), indent=1)
        fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # The rename itself survives a power cut only once the directory is synced too.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -- the gate: UNAVAILABLE while restoring -------------------------------------------------------


class RestoreGate(grpc.aio.ServerInterceptor):
    """Refuses the client API with UNAVAILABLE until the restore is done; the fleet view,
    weights and health stay open (the agents fetch weights from this server while it
    restores)."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in GATED_METHODS:
            return handler
        return _guard(handler, handler_call_details.method, self._admit)

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if not self.open.is_set():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the coordinator restarted and is restoring its jobs; retry shortly",
            )


# -- training jobs that leave a record -----------------------------------------------------------


class PersistedTrainingJobs(TrainingJobs):
    """``TrainingJobs`` whose jobs and checkpoints are written to the state file as they go."""

    def __init__(self, deployer: Deployer, persistence: CoordinatorPersistence) -> None:
        super().__init__(deployer)
        self.persistence = persistence
        self.checkpoints.update(persistence.state.checkpoints)

    async def run(self, job: TrainJob, *, timeout_s: float) -> AsyncGenerator[StepReport, None]:
        job = job.check()
        self.persistence.training_started(job)
        async with contextlib.aclosing(super().run(job, timeout_s=timeout_s)) as reports:
            async for report in reports:
                if report.checkpoint:
                    record = self.checkpoints.get(report.checkpoint)
                    if record is not None:
                        self.persistence.checkpoint_taken(record, self.checkpoints)
                yield report
                if report.step == report.last_step:
                    self.persistence.training_finished(job.job_id)


# -- the coordinator's persistence ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestoreReport:
    agents_expected: int
    agents_alive: int
    fleet_s: float
    orphaned_stages: int
    restored: tuple[str, ...]
    failed: tuple[str, ...]
    total_s: float


class CoordinatorPersistence:
    """The coordinator's state file, the records it writes, and the restore after a restart."""

    def __init__(self, directory: Path, fleet_id: str) -> None:
        self.file = StateFile(directory)
        self.gate = RestoreGate()
        saved = self.file.load()
        if saved is not None and fleet_id and saved.fleet_id and saved.fleet_id != fleet_id:
            _log.warning(
                "coordinator state is of another fleet; not restored",
                saved=saved.fleet_id,
                fleet=fleet_id,
            )
            saved = None
        self.state = saved or CoordinatorState(fleet_id=fleet_id)
        self.state.fleet_id = fleet_id or self.state.fleet_id
        self._registry: FleetRegistry | None = None
        self._restoring = False
        if not self.state.deployments and not self._resumable():
            # Nothing to restore: a fresh coordinator serves from its first call.
            self.gate.open.set()

    def _resumable(self) -> list[TrainingRecord]:
        """Unfinished training jobs with a checkpoint to resume from."""
        return [t for t in self.state.trainings.values() if not t.finished and t.checkpoint]

    def _save(self) -> None:
        if self._registry is not None and not self._restoring:
            alive = sorted(p.node_id for p in self._registry.alive())
            if alive:
                self.state.agents = alive[:MAX_AGENT_RECORDS]
        self.file.save(self.state)

    # records -----------------------------------------------------------------------------------

    def deployed(self, live: LiveSet, plans: Sequence[Plan] | None) -> None:
        """The deployer's hook: ``live`` is up, as asked (``plans`` as given, or planned)."""
        records = self.state.deployments
        records[live.model] = DeploymentRecord(
            model=live.model,
            seed=live.seed,
            qoe=live.qoe,
            workload=live.workload,
            planner=live.planner,
            max_plans=live.max_plans,
            plans=tuple(plans or ()),
        )
        records.move_to_end(live.model)
        while len(records) > MAX_DEPLOYMENT_RECORDS:
            records.popitem(last=False)
        self._save()

    def training_started(self, job: TrainJob) -> None:
        records = self.state.trainings
        before = records.get(job.job_id)
        start = self.state.checkpoints.get(job.resume_from)
        records[job.job_id] = TrainingRecord(
            job_id=job.job_id,
            model=job.model,
            last_step=(start.step if start is not None else 0) + job.steps,
            batch=job.batch,
            microbatches=job.microbatches,
            optimizer=job.optimizer,
            seed=job.seed,
            data_seed=job.data_seed,
            sample_shape=job.sample_shape,
            planner=job.planner,
            checkpoint_every=job.checkpoint_every,
            dataset_batches=job.dataset_batches,
            checkpoint=before.checkpoint if before is not None else job.resume_from,
            step=before.step if before is not None else (start.step if start else 0),
        )
        records.move_to_end(job.job_id)
        while len(records) > MAX_TRAINING_RECORDS:
            records.popitem(last=False)
        self._save()

    def checkpoint_taken(
        self, record: CheckpointRecord, checkpoints: OrderedDict[str, CheckpointRecord]
    ) -> None:
        self.state.checkpoints = OrderedDict(checkpoints)
        job = self.state.trainings.get(record.job_id)
        if job is not None:
            self.state.trainings[record.job_id] = replace(
                job, checkpoint=record.tag, step=record.step
            )
        self._save()

    def training_finished(self, job_id: str) -> None:
        job = self.state.trainings.get(job_id)
        if job is not None:
            self.state.trainings[job_id] = replace(job, finished=True)
            self._save()

    def training_jobs(self, deployer: Deployer) -> PersistedTrainingJobs:
        return PersistedTrainingJobs(deployer, self)

    # restore -----------------------------------------------------------------------------------

    async def restore(
        self, deployer: Deployer, registry: FleetRegistry, *, wait_s: float, timeout_s: float
    ) -> RestoreReport:
        """Rebuild what the state file holds; opens the gate when done, whatever the outcome."""
        began = time.monotonic()
        self._registry = registry
        self._restoring = True
        try:
            return await self._restore(deployer, registry, began, wait_s, timeout_s)
        except Exception:
            # Whatever broke, the coordinator serves on: clients may deploy again themselves.
            _log.exception("restore failed")
            models = tuple(self.state.deployments)
            return RestoreReport(0, 0, 0.0, 0, (), models, time.monotonic() - began)
        finally:
            self._restoring = False
            self.gate.open.set()

    async def _restore(
        self,
        deployer: Deployer,
        registry: FleetRegistry,
        began: float,
        wait_s: float,
        timeout_s: float,
    ) -> RestoreReport:
        records = list(self.state.deployments.values())
        resumable = self._resumable()
        if not records and not resumable:
            _log.info("nothing to restore")
            return RestoreReport(0, len(registry.alive()), 0.0, 0, (), (), 0.0)
        expected = set(self.state.agents)
        for d in records:
            for plan in d.plans:
                expected.update(plan.device_ids)
        _log.info(
            "restoring after a restart",
            deployments=[d.model for d in records],
            resumable_trainings={t.job_id: t.checkpoint for t in resumable},
            waiting_for_agents=sorted(expected),
            wait_s=wait_s,
        )
        # The adapter's LP solver takes seconds to import on a small box: pay that while the
        # agents are found, not after (measured: 3.4 s of an 11 s restore on this host).
        solver = asyncio.ensure_future(asyncio.to_thread(_import_solver))
        # The fleet comes back from the agents' own reports (mDNS, the static list): wait,
        # bounded, for the agents the previous incarnation knew.
        deadline = began + wait_s
        while time.monotonic() < deadline:
            alive = {p.node_id for p in registry.alive()}
            if expected <= alive or (not expected and alive):
                break
            await asyncio.sleep(0.05)
        alive_profiles = registry.alive()
        fleet_s = time.monotonic() - began
        missing = sorted(expected - {p.node_id for p in alive_profiles})
        _log.info(
            "fleet rebuilt from agent reports",
            alive=len(alive_profiles),
            missing=missing,
            seconds=round(fleet_s, 3),
        )
        orphaned = await self._unload_orphans(deployer, [p.address for p in alive_profiles])
        await solver
        restored: list[str] = []
        failed: list[str] = []
        for d in records:
            try:
                await self._redeploy(deployer, d, timeout_s)
                restored.append(d.model)
            except DoraMeshError as err:
                failed.append(d.model)
                _log.error("deployment not restored", model=d.model, error=err.message)
        total = time.monotonic() - began
        _log.info(
            "restored",
            deployments=restored,
            failed=failed or None,
            orphaned_stages_unloaded=orphaned,
            fleet_s=round(fleet_s, 3),
            seconds=round(total, 3),
        )
        return RestoreReport(
            len(expected),
            len(alive_profiles),
            fleet_s,
            orphaned,
            tuple(restored),
            tuple(failed),
            total,
        )

    async def _unload_orphans(self, deployer: Deployer, addresses: Sequence[str]) -> int:
        """Unload every stage the agents hold (this coordinator has loaded none yet: they are
        the dead incarnation's) and start plan epochs above any they report."""

        async def one(address: str) -> tuple[int, int]:
            stub = deployer.agent_stub(address)
            try:
                stats = await stub.GetStats(agent_pb2.GetStatsRequest(), timeout=RESTORE_RPC_S)
                for s in stats.stages:
                    await stub.UnloadStage(
                        agent_pb2.UnloadStageRequest(stage_id=s.stage_id), timeout=RESTORE_RPC_S
                    )
            except grpc.aio.AioRpcError as err:
                _log.warning("could not clear an agent's old stages", address=address, error=err)
                return 0, 0
            return len(stats.stages), max((s.plan_epoch for s in stats.stages), default=0)

        results = await asyncio.gather(*(one(a) for a in addresses))
        newest = max((epoch for _, epoch in results), default=0)
        deployer.epochs_after(newest)
        return sum(n for n, _ in results)

    async def _redeploy(self, deployer: Deployer, d: DeploymentRecord, timeout_s: float) -> None:
        kwargs: dict[str, Any] = {
            "seed": d.seed,
            "qoe": d.qoe,
            "workload": d.workload,
            "planner": d.planner,
            "max_plans": d.max_plans,
            "timeout_s": timeout_s,
        }
        if d.plans:
            try:
                await deployer.deploy(d.model, plans=list(d.plans), **kwargs)
                return
            except DoraMeshError as err:
                # The plan's devices may not all be back: serve with what the fleet has.
                _log.warning(
                    "the recorded plans no longer load; asking the planner",
                    model=d.model,
                    error=err.message,
                )
        await deployer.deploy(d.model, **kwargs)
        # What was asked stays on record: the next restart tries the given plans again.
        self.state.deployments[d.model] = d
        self._save()
