"""Loaded stages and their execution on this device.

A stage is a contiguous range of a zoo model's blocks. Its weights come from a WeightStore (the
coordinator) as safetensors bytes, verified against the digest the deployment named, and cached
on disk by digest so a restart or a re-deployment does not fetch them again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
import torch

from doramesh import models
from doramesh.agent.pacing import ComputePacer
from doramesh.channels import create_channel
from doramesh.errors import (
    DoraMeshError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_for,
)
from doramesh.streams import PeerLink, Replica
from doramesh.tokenbucket import TokenBucket
from doramesh.v1 import coordinator_pb2, coordinator_pb2_grpc

_log = structlog.get_logger("agent.runtime")

#: Largest stage a WeightStore may send (a 1B model's stage in fp32 fits well under this).
MAX_STAGE_WEIGHT_BYTES = 8 << 30


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


async def _close_links(stage: LoadedStage) -> None:
    for replica in stage.next:
        await replica.link.close()


class WeightCache:
    """Stage weights on disk, content-addressed by sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}.safetensors"

    def get(self, digest: str) -> bytes | None:
        path = self.path(digest)
        if not path.exists():
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            _log.warning("cached weights corrupt; refetching", digest=digest[:12])
            path.unlink(missing_ok=True)
            return None
        return data

    def put(self, digest: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path(digest).with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(self.path(digest))


async def fetch_weights(spec: StageSpec, *, timeout_s: float = 300.0) -> bytes:
    """Pull a stage's safetensors bytes from its WeightStore and verify the digest."""
    channel = create_channel(spec.weights_source)
    try:
        stub = coordinator_pb2_grpc.WeightStoreStub(channel)
        request = coordinator_pb2.FetchStageRequest(
            model=spec.model,
            seed=spec.seed,
            first=spec.first,
            last=spec.last,
            digest=spec.weights_digest,
        )
        buf = bytearray()
        total = -1
        hasher = hashlib.sha256()
        try:
            async for chunk in stub.FetchStage(request, timeout=timeout_s):
                if total < 0:
                    total = chunk.total_bytes
                    if total > MAX_STAGE_WEIGHT_BYTES:
                        raise ResourceExhausted(f"stage weights of {total} bytes are too large")
                if chunk.offset != len(buf) or len(buf) + len(chunk.data) > total:
                    raise InvalidArgument("weight chunks out of order or past the announced size")
                buf += chunk.data
                hasher.update(chunk.data)
        except grpc.aio.AioRpcError as err:
            raise error_for(err.code(), f"fetching weights: {err.details()}") from err
        if len(buf) != total:
            raise Unavailable(f"weight stream ended at {len(buf)} of {total} bytes")
        digest = hasher.hexdigest()
        if digest != spec.weights_digest:
            raise InvalidArgument(
                f"weights digest mismatch: got {digest[:12]}, expected {spec.weights_digest[:12]}"
            )
        return bytes(buf)
    finally:
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
        need = sum(layer.param_bytes for layer in layers)
        async with self._load_lock:
            old = self.stages.get(spec.stage_id)
            free = self.memory_bytes - self.used_bytes + (old.param_bytes if old else 0)
            if need > free:
                raise ResourceExhausted(
                    f"stage {spec.stage_id} needs {need / 2**20:.1f} MiB of weights; this agent "
                    f"has {free / 2**20:.1f} MiB free of {self.memory_bytes / 2**20:.1f} MiB"
                )
            data = self.cache.get(spec.weights_digest)
            cache_hit = data is not None
            if data is None:
                data = await fetch_weights(spec)
                await asyncio.to_thread(self.cache.put, spec.weights_digest, data)
            module = await asyncio.to_thread(
                models.load_stage, spec.model, spec.first, spec.last, data, device=self.device
            )
            next_replicas = [
                Replica(
                    PeerLink(
                        hop.address,
                        bucket=(
                            TokenBucket(hop.rate_mbps * 1e6 / 8, max(hop.burst_kb, 64) * 1e3)
                            if hop.rate_mbps > 0
                            else None
                        ),
                    ),
                    hop.stage_id,
                    hop.share,
                )
                for hop in spec.next
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
        )
        return stage, cache_hit, elapsed

    async def unload(self, stage_id: str) -> bool:
        stage = self.stages.pop(stage_id, None)
        if stage is None:
            return False
        await _close_links(stage)
        return True

    def get(self, stage_id: str, plan_epoch: int) -> LoadedStage:
        stage = self.stages.get(stage_id)
        if stage is None:
            raise NotFound(f"no stage {stage_id!r} is loaded on this agent")
        if stage.spec.plan_epoch != plan_epoch:
            from doramesh.errors import Aborted

            raise Aborted(
                f"stage {stage_id!r} runs plan epoch {stage.spec.plan_epoch}, not {plan_epoch}"
            )
        return stage

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

        async with self._compute:
            out, seconds = await self.pacer.run(run, stage.gflops_per_sample * batch * scale)
        stage.served += 1
        stage.compute_s += seconds
        return out, seconds

    async def close(self) -> None:
        for stage_id in list(self.stages):
            await self.unload(stage_id)
