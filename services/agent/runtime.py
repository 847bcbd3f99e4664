"""Loaded stages and their execution on this device.

A stage is a contiguous range of a zoo model's blocks. Its weights come from a WeightStore (the
coordinator) as safetensors bytes, verified against the digest the deployment named, and cached
on disk by digest so a restart or a re-deployment does not fetch them again.

Loading streams: the chunks go straight into the cache file (hashed on the way), and the stage's
tensors map that file, so the peak is the stage once, never the stage plus a buffer of its
bytes (a Raspberry Pi with a 1 GiB stage has no room for a second copy).

A stage loaded for training (``StageSpec.train``) also holds a ``StageTrainer`` (gradients,
optimizer, replica group; see ``doramesh.agent.training``) and reaches its next stage through
training links; its checkpoints live next to the weight cache, under ``checkpoints/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
import torch

from doramesh import models
from doramesh.agent.pacing import ComputePacer
from doramesh.agent.training import CheckpointStore, StageTrainer, StepResult, TrainSettings
from doramesh.channels import create_channel
from doramesh.errors import (
    DoraMeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_for,
)
from doramesh.streams import PeerLink, Replica
from doramesh.tokenbucket import TokenBucket
from doramesh.training import TrainLink, TrainReplica
from doramesh.v1 import coordinator_pb2, coordinator_pb2_grpc

_log = structlog.get_logger("agent.runtime")

#: Largest stage a WeightStore may send (a 1B model's stage in fp32 fits well under this).
MAX_STAGE_WEIGHT_BYTES = 8 << 30
#: Unloaded stages remembered, so late traffic of a retired plan epoch is refused by name.
MAX_RETIRED_STAGES = 4096
#: Cancelled request ids remembered, so their microbatches still on the way are dropped.
MAX_CANCELLED_REQUESTS = 4096
#: Weight of the newest computation in the device's measured speed (seconds per GFLOP): high,
#: because a paced computation is already exact (the pacer waits to the emulated time) and the
#: coordinator's hysteresis, not this average, is what keeps the adapter from flapping.
SPEED_EWMA_ALPHA = 0.7


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What the coordinator asked this agent to hold (one replica of one stage)."""

    stage_id: str
    plan_epoch: int
    model: str
    seed: int
    first: int
    last: int
    weights_digest: str
    weights_source: str
    next: tuple[NextHopSpec, ...] = ()
    #: Set when the stage is loaded for training.
    train: TrainSettings | None = None


@dataclass(frozen=True, slots=True)
class NextHopSpec:
    address: str
    stage_id: str
    share: float
    rate_mbps: float = 0.0
    burst_kb: float = 0.0


@dataclass(slots=True)
class LoadedStage:
    spec: StageSpec
    module: torch.nn.Module
    param_bytes: int
    gflops_per_sample: float
    #: Bytes of one sample of this stage's input at the profiled shape; an input of another
    #: size (a shorter sequence, a smaller image) scales the paced compute time with it.
    input_bytes_per_sample: int
    next: list[Replica]
    served: int = 0
    compute_s: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    trainer: StageTrainer | None = None
    #: A training stage's next stage, reached through training links (``next`` stays empty).
    train_next: list[TrainReplica] = field(default_factory=list)

    def require_trainer(self) -> StageTrainer:
        if self.trainer is None:
            raise FailedPrecondition(f"stage {self.spec.stage_id!r} is not loaded for training")
        return self.trainer


async def _close_links(stage: LoadedStage) -> None:
    for replica in stage.next:
        await replica.link.close()
    for train_replica in stage.train_next:
        await train_replica.link.close()
    if stage.trainer is not None:
        await stage.trainer.close()


def _bucket(hop: NextHopSpec) -> TokenBucket | None:
    if hop.rate_mbps <= 0:
        return None
    return TokenBucket(hop.rate_mbps * 1e6 / 8, max(hop.burst_kb, 64) * 1e3)


def _training_copies(spec: StageSpec) -> int:
    """Copies of the weights a stage holds: 1 for inference; for training also the gradient
    sum and the optimizer's state (momentum: 1, Adam: 2). Activations are not counted."""
    if spec.train is None:
        return 1
    opt = spec.train.optimizer
    states = 2 if opt.name in ("adam", "adamw") else (1 if opt.momentum > 0 else 0)
    return 2 + states


class WeightCache:
    """Stage weights on disk, content-addressed by sha256, at most ``max_bytes`` of them: the
    least recently used files go first (the one just written always stays)."""

    def __init__(self, root: Path, *, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._remove_stale_downloads()

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}.safetensors"

    def _remove_stale_downloads(self) -> None:
        """Downloads a process that has since died left half written (they count toward no
        bound otherwise)."""
        for tmp in self.root.glob("incoming-*.tmp"):
            pid = tmp.name.split("-")[1]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def get(self, digest: str) -> Path | None:
        """The file holding ``digest``'s weights, checked against the digest; None if absent."""
        path = self.path(digest)
        if not path.exists():
            return None
        if models.file_sha256(path) != digest:
            _log.warning("cached weights corrupt; refetching", digest=digest[:12])
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # most recently used: the last to be evicted
        return path

    def tmp_path(self) -> Path:
        """A fresh file name in the cache for a download in progress."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"incoming-{os.getpid()}-{uuid.uuid4().hex}.tmp"

    def commit(self, digest: str, tmp: Path) -> Path:
        """Move a verified download into place under its digest, then keep to the bound."""
        path = self.path(digest)
        tmp.replace(path)
        if self.max_bytes is not None:
            self._evict(keep=path)
        return path

    def _evict(self, *, keep: Path) -> None:
        files = []
        for path in self.root.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):  # another process evicted it
                st = path.stat()
                files.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= (self.max_bytes or 0):
                break
            if path != keep:
                # A loaded stage maps its file: removing the name leaves the mapping intact.
                path.unlink(missing_ok=True)
                total -= size


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def fetch_weights(spec: StageSpec, *, cache: WeightCache, timeout_s: float = 300.0) -> Path:
    """Stream a stage's safetensors bytes from its WeightStore into ``cache``, verifying the
    digest on the way; returns the cached file. At most one chunk is held in memory."""
    channel = create_channel(spec.weights_source)
    tmp = cache.tmp_path()
    try:
        stub = coordinator_pb2_grpc.WeightStoreStub(channel)
        request = coordinator_pb2.FetchStageRequest(
            model=spec.model,
            seed=spec.seed,
            first=spec.first,
            last=spec.last,
            digest=spec.weights_digest,
        )
        received = 0
        total = -1
        hasher = hashlib.sha256()
        with tmp.open("wb") as out:
            try:
                async for chunk in stub.FetchStage(request, timeout=timeout_s):
                    if total < 0:
                        total = chunk.total_bytes
                        if total > MAX_STAGE_WEIGHT_BYTES:
                            raise ResourceExhausted(f"stage weights of {total} bytes are too large")
                    if chunk.offset != received or received + len(chunk.data) > total:
                        raise InvalidArgument(
                            "weight chunks out of order or past the announced size"
                        )
                    await asyncio.to_thread(out.write, chunk.data)
                    received += len(chunk.data)
                    hasher.update(chunk.data)
            except grpc.aio.AioRpcError as err:
                raise error_for(err.code(), f"fetching weights: {err.details()}") from err
        if received != total:
            raise Unavailable(f"weight stream ended at {received} of {total} bytes")
        digest = hasher.hexdigest()
        if digest != spec.weights_digest:
            raise InvalidArgument(
                f"weights digest mismatch: got {digest[:12]}, expected {spec.weights_digest[:12]}"
            )
        return await asyncio.to_thread(cache.commit, digest, tmp)
    finally:
        tmp.unlink(missing_ok=True)
        await channel.close()


class StageRuntime:
    """The stages this agent holds, the memory they take, and running them."""

    def __init__(
        self,
        *,
        memory_bytes: int,
        cache: WeightCache,
        pacer: ComputePacer,
        device: str = "cpu",
    ) -> None:
        self.memory_bytes = memory_bytes
        self.cache = cache
        self.pacer = pacer
        self.device = torch.device(device)
        self.stages: dict[str, LoadedStage] = {}
        #: One compute resource per device: stages take turns, as on a real board.
        self._compute = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self.checkpoints = CheckpointStore(cache.root / "checkpoints")
        #: Stage id -> plan epoch of stages unloaded here (bounded, oldest forgotten first).
        self.retired: OrderedDict[str, int] = OrderedDict()
        #: The device's measured speed: EWMA of paced seconds per GFLOP, over computations.
        self.computations = 0
        self.seconds_per_gflop = 0.0
        #: Request ids the coordinator cancelled (bounded), and the work running for each request.
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        self.inflight: dict[str, set[asyncio.Task[None]]] = {}
        self.cancelled_microbatches = 0

    @property
    def used_bytes(self) -> int:
        return sum(s.param_bytes for s in self.stages.values())

    async def load(self, spec: StageSpec) -> tuple[LoadedStage, bool, float]:
        start = time.perf_counter()
        try:
            table = models.layer_table(spec.model)
        except DoraMeshError:
            raise
        if not (0 <= spec.first <= spec.last < len(table.layers)):
            raise InvalidArgument(
                f"layers [{spec.first}, {spec.last}] out of range for {spec.model} "
                f"({len(table.layers)} layers)"
            )
        layers = table.layers[spec.first : spec.last + 1]
        need = sum(layer.param_bytes for layer in layers) * _training_copies(spec)
        async with self._load_lock:
            old = self.stages.get(spec.stage_id)
            free = self.memory_bytes - self.used_bytes + (old.param_bytes if old else 0)
            if need > free:
                raise ResourceExhausted(
                    f"stage {spec.stage_id} needs {need / 2**20:.1f} MiB of weights; this agent "
                    f"has {free / 2**20:.1f} MiB free of {self.memory_bytes / 2**20:.1f} MiB"
                )
            path = await asyncio.to_thread(self.cache.get, spec.weights_digest)
            cache_hit = path is not None
            if path is None:
                path = await fetch_weights(spec, cache=self.cache)
            module = await asyncio.to_thread(
                models.load_stage, spec.model, spec.first, spec.last, path, device=self.device
            )
            trainer = None
            if spec.train is not None:
                trainer = await asyncio.to_thread(self._trainer, spec, module)
            next_replicas = [
                Replica(PeerLink(hop.address, bucket=_bucket(hop)), hop.stage_id, hop.share)
                for hop in spec.next
                if spec.train is None
            ]
            train_next = [
                TrainReplica(TrainLink(hop.address, bucket=_bucket(hop)), hop.stage_id, hop.share)
                for hop in spec.next
                if spec.train is not None
            ]
            stage = LoadedStage(
                spec=spec,
                module=module,
                param_bytes=need,
                gflops_per_sample=sum(layer.gflops for layer in layers),
                input_bytes_per_sample=(
                    table.input_bytes
                    if spec.first == 0
                    else table.layers[spec.first - 1].activation_bytes
                ),
                next=next_replicas,
                trainer=trainer,
                train_next=train_next,
            )
            if old is not None:
                await _close_links(old)
            self.stages[spec.stage_id] = stage
        elapsed = time.perf_counter() - start
        _log.info(
            "stage loaded",
            stage_id=spec.stage_id,
            model=spec.model,
            layers=[spec.first, spec.last],
            mib=round(need / 2**20, 1),
            cache_hit=cache_hit,
            seconds=round(elapsed, 3),
            training=spec.train is not None,
            resumed_step=trainer.step if trainer is not None else None,
        )
        return stage, cache_hit, elapsed

    def _trainer(self, spec: StageSpec, module: torch.nn.Module) -> StageTrainer:
        assert spec.train is not None
        trainer = StageTrainer.create(spec.train, module, spec.model, spec.first, spec.last)
        if spec.train.resume_tag:
            data = self.checkpoints.load(spec.train.resume_tag, spec.model, spec.first, spec.last)
            trainer.load_checkpoint(data)
        return trainer

    async def unload(self, stage_id: str) -> bool:
        stage = self.stages.pop(stage_id, None)
        if stage is None:
            return False
        self.retired[stage_id] = stage.spec.plan_epoch
        while len(self.retired) > MAX_RETIRED_STAGES:
            self.retired.popitem(last=False)
        await _close_links(stage)
        return True

    def get(self, stage_id: str, plan_epoch: int) -> LoadedStage:
        """The loaded stage for traffic of ``plan_epoch``; traffic of an older (retired or
        replaced) epoch is refused with FailedPrecondition so its sender replays it on a live
        plan."""
        stage = self.stages.get(stage_id)
        if stage is None:
            if stage_id in self.retired:
                raise FailedPrecondition(
                    f"stage {stage_id!r} of plan epoch {self.retired[stage_id]} is retired"
                )
            raise NotFound(f"no stage {stage_id!r} is loaded on this agent")
        if stage.spec.plan_epoch != plan_epoch:
            raise FailedPrecondition(
                f"stage {stage_id!r} runs plan epoch {stage.spec.plan_epoch}, not {plan_epoch}"
            )
        return stage

    # -- live control: measurements, pacing, cancellation -------------------------------------

    def _measured(self, gflops: float, seconds: float) -> None:
        if gflops <= 0:
            return
        sample = seconds / gflops
        self.computations += 1
        if self.computations == 1:
            self.seconds_per_gflop = sample
        else:
            a = SPEED_EWMA_ALPHA
            self.seconds_per_gflop = a * sample + (1 - a) * self.seconds_per_gflop

    def set_flow_rate(
        self, stage_id: str, next_stage_id: str, rate_mbps: float, burst_kb: float
    ) -> TokenBucket | None:
        """Re-pace one outgoing flow live; returns its bucket (None when now unpaced)."""
        stage = self.stages.get(stage_id)
        if stage is None:
            raise NotFound(f"no stage {stage_id!r} is loaded on this agent")
        # Inference flows only: a training job's flows keep the pacing they were loaded with.
        links = [r.link for r in stage.next if r.stage_id == next_stage_id]
        if not links:
            raise NotFound(f"stage {stage_id!r} has no inference next hop {next_stage_id!r}")
        hop = NextHopSpec("", next_stage_id, 1.0, rate_mbps, burst_kb)
        fresh = _bucket(hop)
        for link in links:
            if fresh is None:
                if link.bucket is not None:
                    link.bucket.set_rate(None, link.bucket.burst)
            elif link.bucket is None:
                link.bucket = fresh
            else:
                link.bucket.set_rate(fresh.rate, fresh.burst)
        return links[0].bucket if fresh is not None else None

    def is_cancelled(self, request_id: str) -> bool:
        return bool(request_id) and request_id in self.cancelled

    def track(self, request_id: str, task: asyncio.Task[None]) -> None:
        """Remember ``task`` as work of ``request_id`` until it ends, so a cancel can stop it."""
        if not request_id:
            return
        tasks = self.inflight.setdefault(request_id, set())
        tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            if not tasks and self.inflight.get(request_id) is tasks:
                del self.inflight[request_id]

        task.add_done_callback(done)

    def cancel(self, request_id: str) -> int:
        """Drop a request's work here: running microbatches are cancelled, later ones refused."""
        self.cancelled[request_id] = None
        self.cancelled.move_to_end(request_id)
        while len(self.cancelled) > MAX_CANCELLED_REQUESTS:
            self.cancelled.popitem(last=False)
        tasks = self.inflight.pop(request_id, set())
        for task in tasks:
            task.cancel()
        self.cancelled_microbatches += len(tasks)
        return len(tasks)

    async def compute(self, stage: LoadedStage, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Run the stage on one microbatch, paced to the emulated device's speed."""
        batch = x.shape[0] if x.dim() > 0 else 1
        sample_bytes = x.numel() * x.element_size() / max(batch, 1)
        scale = sample_bytes / stage.input_bytes_per_sample if stage.input_bytes_per_sample else 1
        module = stage.module
        device = self.device

        def run() -> torch.Tensor:
            with torch.inference_mode():
                try:
                    out = module(x.to(device))
                except (RuntimeError, IndexError, ValueError, TypeError) as err:
                    raise InvalidArgument(
                        f"stage {stage.spec.stage_id} rejected input of shape "
                        f"{tuple(x.shape)} and dtype {x.dtype}: {err}"
                    ) from err
                result: torch.Tensor = out.detach().to("cpu").contiguous()
                return result

        gflops = stage.gflops_per_sample * batch * scale
        async with self._compute:
            out, seconds = await self.pacer.run(run, gflops)
        self._measured(gflops, seconds)
        stage.served += 1
        stage.compute_s += seconds
        return out, seconds

    # -- training -----------------------------------------------------------------------------

    def _gflops(self, stage: LoadedStage, x: torch.Tensor) -> float:
        """The stage's forward GFLOPs on ``x``, scaled from its profiled input size."""
        batch = x.shape[0] if x.dim() > 0 else 1
        sample_bytes = x.numel() * x.element_size() / max(batch, 1)
        scale = sample_bytes / stage.input_bytes_per_sample if stage.input_bytes_per_sample else 1
        return stage.gflops_per_sample * batch * scale

    async def train_forward(
        self, stage: LoadedStage, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The forward pass of a training part, with its graph: (input leaf, output, seconds)."""
        trainer = stage.require_trainer()
        x = x.to(self.device)
        async with self._compute:
            (leaf, y), seconds = await self.pacer.run(
                lambda: trainer.forward(x), self._gflops(stage, x)
            )
        stage.compute_s += seconds
        return leaf, y, seconds

    async def train_backward(
        self,
        stage: LoadedStage,
        leaf: torch.Tensor,
        y: torch.Tensor,
        grad_y: torch.Tensor,
    ) -> tuple[torch.Tensor, float]:
        """Backward from the gradient of the stage's output; (input gradient, seconds).

        Backward is paced as twice the forward's FLOPs, as the planner's cost model assumes.
        """
        trainer = stage.require_trainer()
        grad_y = grad_y.to(self.device)
        async with self._compute:
            grad_x, seconds = await self.pacer.run(
                lambda: trainer.backward(leaf, y, grad_y), 2 * self._gflops(stage, leaf)
            )
        stage.compute_s += seconds
        return grad_x.to("cpu"), seconds

    async def train_loss_backward(
        self,
        stage: LoadedStage,
        leaf: torch.Tensor,
        y: torch.Tensor,
        labels: torch.Tensor,
        loss_scale: float,
    ) -> tuple[torch.Tensor, float, float]:
        """At the last stage: loss and backward; (input gradient, loss, seconds)."""
        trainer = stage.require_trainer()
        labels = labels.to(self.device)
        async with self._compute:
            (grad_x, loss), seconds = await self.pacer.run(
                lambda: trainer.loss_backward(leaf, y, labels, loss_scale),
                2 * self._gflops(stage, leaf),
            )
        stage.compute_s += seconds
        return grad_x.to("cpu"), loss, seconds

    async def train_step(
        self, stage: LoadedStage, step: int, *, timeout: float | None
    ) -> StepResult:
        """End a step: sum gradients with the stage's other replicas, then the optimizer step."""
        trainer = stage.require_trainer()
        trainer.check_step(step)
        start = time.perf_counter()
        async with trainer.sync_lock:
            trainer.check_step(step)
            parts = trainer.parts
            if trainer.group_size == 1:
                summed = trainer.flat_grads()
            elif trainer.rendezvous is not None:
                summed = await asyncio.wait_for(
                    trainer.rendezvous.contribute(
                        step, 0, trainer.flat_grads(), expected_step=trainer.step + 1
                    ),
                    timeout,
                )
            else:
                summed = await trainer.sync_with_root(step, stage.spec.plan_epoch, timeout)
                summed = [t.to(self.device) for t in summed]
            synced = time.perf_counter()
            async with self._compute:
                await asyncio.to_thread(trainer.apply, summed, step)
        done = time.perf_counter()
        _log.debug(
            "train step",
            stage_id=stage.spec.stage_id,
            step=step,
            parts=parts,
            sync_ms=round((synced - start) * 1e3, 2),
        )
        return StepResult(step, parts, synced - start, done - synced)

    async def contribute_gradients(
        self, stage: LoadedStage, step: int, rank: int, tensors: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Rank 0's side of another replica's SyncGradients: its share in, the sum out."""
        trainer = stage.require_trainer()
        if trainer.rendezvous is None:
            raise FailedPrecondition(
                f"stage {stage.spec.stage_id!r} is rank {trainer.settings.rank}, not its "
                "group's rank 0"
            )
        trainer.check_flat(tensors)
        return await trainer.rendezvous.contribute(
            step, rank, [t.to(self.device) for t in tensors], expected_step=trainer.step + 1
        )

    async def save_checkpoint(
        self, stage: LoadedStage, tag: str, step: int
    ) -> tuple[str, int, str]:
        """Write the stage's checkpoint; (path, bytes, sha256)."""
        trainer = stage.require_trainer()
        if step != trainer.step:
            raise FailedPrecondition(
                f"checkpoint of step {step} asked, but the stage is at step {trainer.step}"
            )
        async with self._compute:
            data = await asyncio.to_thread(trainer.checkpoint_bytes)
        spec = stage.spec
        path, digest = await asyncio.to_thread(
            self.checkpoints.save, tag, spec.model, spec.first, spec.last, data
        )
        _log.info("checkpoint saved", stage_id=spec.stage_id, tag=tag, step=step, bytes=len(data))
        return str(path), len(data), digest

    async def close(self) -> None:
        for stage_id in list(self.stages):
            await self.unload(stage_id)
