"""A stage being trained on this agent: its autograd passes, its gradients, its optimizer, its
replica group's gradient sum, and its checkpoints.

The forward pass of a part keeps its graph in the handler that waits for the part's gradient
(see ``AgentServicer.Forward``), so nothing is stored between the two passes but that handler's
locals. Parameter gradients of every part of a step are summed here; at the end of the step the
stage's replicas sum theirs (rank 0 reduces, in rank order, and hands the one sum back to all),
and every replica applies the same optimizer step to the same weights, so they stay identical.

The module stays in eval mode while it trains: BatchNorm uses its running statistics (frozen
BN, the usual choice when fine-tuning on small devices, and the only one under which a batch
split across replicas gives the full batch's result) and dropout, which the zoo does not use,
would be off. Parameters still get gradients and updates, BN's affine ones included.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from doramesh.channels import CHUNK_BYTES, create_channel
from doramesh.errors import (
    Aborted,
    DoraMeshError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    error_for,
)
from doramesh.tensors import FrameAssembler
from doramesh.training import OptimizerSpec, part_loss, tagged_frames
from doramesh.v1 import agent_pb2, agent_pb2_grpc

_log = structlog.get_logger("agent.training")

CHECKPOINT_FORMAT = "doramesh-checkpoint/1"
CHECKPOINT_METADATA_KEY = "doramesh.checkpoint"
_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def check_tag(tag: str) -> str:
    """A checkpoint tag is one safe path component."""
    if not _TAG.match(tag) or tag in {".", ".."}:
        raise InvalidArgument(f"checkpoint tag {tag!r} must match [A-Za-z0-9_.-]{{1,128}}")
    return tag


@dataclass(frozen=True, slots=True)
class ReplicaPeerSpec:
    address: str
    stage_id: str


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """How the coordinator asked this replica to train (``LoadStageRequest.train``)."""

    job_id: str
    optimizer: OptimizerSpec
    rank: int = 0
    group: tuple[ReplicaPeerSpec, ...] = ()
    resume_tag: str = ""


@dataclass(frozen=True, slots=True)
class StepResult:
    step: int
    parts: int
    sync_s: float
    step_s: float


class GradientRendezvous:
    """Rank 0's meeting point for one step's gradients: waits for every rank, sums in rank
    order, gives every rank the same sum. At most one step is open at a time."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._step = 0
        self._parts: dict[int, list[torch.Tensor]] = {}
        self._result: asyncio.Future[list[torch.Tensor]] | None = None

    async def contribute(
        self, step: int, rank: int, tensors: list[torch.Tensor], *, expected_step: int
    ) -> list[torch.Tensor]:
        if step != expected_step:
            raise Aborted(f"gradients for step {step}, but this stage is at step {expected_step}")
        if not 0 <= rank < self.size:
            raise InvalidArgument(f"rank {rank} is not in a group of {self.size}")
        if self._result is None or self._step != step:
            self._step = step
            self._parts = {}
            self._result = asyncio.get_running_loop().create_future()
        result = self._result
        if rank in self._parts:
            raise InvalidArgument(f"rank {rank} already sent its gradients for step {step}")
        self._parts[rank] = tensors
        if len(self._parts) == self.size:
            parts, self._parts = self._parts, {}
            total = [t.clone() for t in parts[0]]
            for r in range(1, self.size):
                for acc, t in zip(total, parts[r], strict=True):
                    acc.add_(t)
            result.set_result(total)
        return await asyncio.shield(result)

    def abandon(self, err: DoraMeshError) -> None:
        """Fail the open step's waiters (the stage is being unloaded)."""
        if self._result is not None and not self._result.done():
            self._result.set_exception(err)


@dataclass(slots=True)
class StageTrainer:
    """The training state of one stage replica."""

    settings: TrainSettings
    module: torch.nn.Module
    model: str
    first: int
    last: int
    optimizer: torch.optim.Optimizer
    names: list[str]
    params: list[torch.nn.Parameter]
    #: The last completed optimizer step (the checkpoint's, after a resume).
    step: int = 0
    parts: int = 0
    grads: list[torch.Tensor] | None = None
    rendezvous: GradientRendezvous | None = None
    root_channel: grpc.aio.Channel | None = None
    sync_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def create(
        cls, settings: TrainSettings, module: torch.nn.Module, model: str, first: int, last: int
    ) -> StageTrainer:
        named = [(n, p) for n, p in module.named_parameters()]
        for _, p in named:
            p.requires_grad_(True)
        params = [p for _, p in named]
        return cls(
            settings=settings,
            module=module.eval(),
            model=model,
            first=first,
            last=last,
            optimizer=settings.optimizer.build(params),
            names=[n for n, _ in named],
            params=params,
            rendezvous=GradientRendezvous(len(settings.group)) if settings.rank == 0 else None,
        )

    @property
    def group_size(self) -> int:
        return max(len(self.settings.group), 1)

    def check_step(self, step: int) -> None:
        if step != self.step + 1:
            raise Aborted(
                f"stage is at step {self.step}; it takes parts of step {self.step + 1}, not {step}"
            )

    # -- the two passes (called in a worker thread, under the runtime's compute lock) ---------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the input as a graph leaf, the output with its graph)."""
        with torch.enable_grad():
            # Stage 0 needs no input gradient (nobody upstream), nor does integer input.
            leaf = x.detach().requires_grad_(self.first > 0 and x.is_floating_point())
            try:
                y = self.module(leaf)
            except (RuntimeError, IndexError, ValueError, TypeError) as err:
                raise InvalidArgument(
                    f"stage [{self.first}, {self.last}] rejected training input of shape "
                    f"{list(x.shape)} and dtype {x.dtype}: {err}"
                ) from err
        if not isinstance(y, torch.Tensor):
            raise InvalidArgument("the stage did not return a tensor")
        return leaf, y

    def backward(self, leaf: torch.Tensor, y: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        """Backward from the gradient of the output; returns the gradient of the input."""
        if grad_y.shape != y.shape or grad_y.dtype != y.dtype:
            raise InvalidArgument(
                f"gradient of shape {list(grad_y.shape)} ({grad_y.dtype}) for an output of "
                f"shape {list(y.shape)} ({y.dtype})"
            )
        return self._backward(leaf, y, grad_y)

    def loss_backward(
        self, leaf: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, loss_scale: float
    ) -> tuple[torch.Tensor, float]:
        """At the last stage: the part's loss, and backward from it."""
        with torch.enable_grad():
            loss = part_loss(y, labels, loss_scale)
        return self._backward(leaf, loss, None), float(loss.item())

    def _backward(
        self, leaf: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor | None
    ) -> torch.Tensor:
        inputs = [*self.params, leaf] if leaf.requires_grad else list(self.params)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        param_grads = grads[: len(self.params)]
        if self.grads is None:
            self.grads = [
                torch.zeros_like(p) if g is None else g.detach().clone()
                for p, g in zip(self.params, param_grads, strict=True)
            ]
        else:
            for acc, g in zip(self.grads, param_grads, strict=True):
                if g is not None:
                    acc.add_(g)
        self.parts += 1
        if leaf.requires_grad:
            grad_in = grads[-1]
            assert grad_in is not None
            return grad_in.detach().contiguous()
        return torch.empty(0, dtype=torch.float32)

    # -- the step -------------------------------------------------------------------------------

    def flat_grads(self) -> list[torch.Tensor]:
        """This replica's summed gradients as one flat tensor per dtype (zeros if it ran no
        part this step): few large tensors stream better than many small ones."""
        grads = self.grads or [torch.zeros_like(p) for p in self.params]
        return [
            torch.cat([grads[i].reshape(-1) for i in idx]) for idx in self._dtype_groups().values()
        ]

    def _dtype_groups(self) -> dict[torch.dtype, list[int]]:
        groups: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(self.params):
            groups.setdefault(p.dtype, []).append(i)
        return dict(sorted(groups.items(), key=lambda kv: str(kv[0])))

    def flat_layout(self) -> list[tuple[torch.dtype, int]]:
        """(dtype, elements) of each flat gradient tensor, in order."""
        return [
            (dtype, sum(self.params[i].numel() for i in idx))
            for dtype, idx in self._dtype_groups().items()
        ]

    def check_flat(self, tensors: list[torch.Tensor]) -> None:
        layout = self.flat_layout()
        got = [(t.dtype, t.numel(), t.dim()) for t in tensors]
        if got != [(d, n, 1) for d, n in layout]:
            raise InvalidArgument(
                f"gradients {[(str(d), n) for d, n, _ in got]} do not match this stage's "
                f"{[(str(d), n) for d, n in layout]}"
            )

    def apply(self, flat: list[torch.Tensor], step: int) -> None:
        """Set the summed gradients and take the optimizer step."""
        self.check_flat(flat)
        for tensor, idx in zip(flat, self._dtype_groups().values(), strict=True):
            offset = 0
            for i in idx:
                p = self.params[i]
                p.grad = tensor[offset : offset + p.numel()].view_as(p).to(p.device, copy=True)
                offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.grads = None
        self.parts = 0
        self.step = step

    async def sync_with_root(
        self, step: int, plan_epoch: int, timeout: float | None
    ) -> list[torch.Tensor]:
        """A rank > 0 replica's half of the gradient sum: send ours to rank 0, get the sum."""
        root = self.settings.group[0]
        if self.root_channel is None:
            self.root_channel = create_channel(root.address)
        stub = agent_pb2_grpc.AgentStub(self.root_channel)
        mine = self.flat_grads()
        sync = agent_pb2.GradientSync(step=step, rank=self.settings.rank, count=len(mine))

        def tag(header: agent_pb2.ActivationHeader) -> None:
            header.sync.CopyFrom(sync)

        def frames() -> Iterator[agent_pb2.ActivationFrame]:
            for i, t in enumerate(mine):
                yield from tagged_frames(
                    t,
                    tag,
                    stage_id=root.stage_id,
                    plan_epoch=plan_epoch,
                    request_id=self.settings.job_id,
                    microbatch_id=i,
                )

        max_bytes = max((t.numel() * t.element_size() for t in mine), default=0)
        assembler = FrameAssembler(max_bytes, max_chunk_bytes=CHUNK_BYTES, max_pending=len(mine))
        got: dict[int, torch.Tensor] = {}
        try:
            call = stub.SyncGradients(frames(), timeout=timeout)
            async for frame in call:
                if frame.HasField("header") and frame.header.error:
                    raise error_for(frame.header.error_code, frame.header.error)
                done = assembler.feed(frame)
                if done is not None:
                    header, tensor = done
                    got[header.microbatch_id] = tensor
        except grpc.aio.AioRpcError as err:
            raise error_for(
                err.code(), f"summing gradients with {root.address}: {err.details()}"
            ) from err
        if sorted(got) != list(range(len(mine))):
            raise Unavailable(f"rank 0 at {root.address} answered {len(got)} of {len(mine)} sums")
        return [got[i] for i in range(len(mine))]

    async def close(self) -> None:
        if self.rendezvous is not None:
            self.rendezvous.abandon(Aborted("the stage was unloaded"))
        if self.root_channel is not None:
            await self.root_channel.close()
            self.root_channel = None

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_bytes(self) -> bytes:
        """Parameters, buffers and optimizer state as safetensors, plus what they belong to."""
        tensors: dict[str, torch.Tensor] = {
            f"model.{k}": v.detach().to("cpu", copy=True).contiguous()
            for k, v in self.module.state_dict().items()
        }
        state = self.optimizer.state_dict()["state"]
        for i, name in enumerate(self.names):
            for key, value in state.get(i, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
                elif value is not None:
                    tensors[f"optim.{name}.{key}"] = torch.tensor(float(value), dtype=torch.float64)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model,
            "first": self.first,
            "last": self.last,
            "step": self.step,
            "optimizer": self.settings.optimizer.name,
            "job_id": self.settings.job_id,
        }
        return st_save(
            tensors, metadata={CHECKPOINT_METADATA_KEY: json.dumps(meta, sort_keys=True)}
        )

    def load_checkpoint(self, data: bytes) -> int:
        """Restore parameters, buffers and optimizer state; returns the checkpoint's step."""
        try:
            tensors = st_load(data)
            meta = json.loads(_safetensors_metadata(data).get(CHECKPOINT_METADATA_KEY, "{}"))
        except (SafetensorError, json.JSONDecodeError, ValueError) as err:
            raise InvalidArgument(f"checkpoint is not a doramesh checkpoint: {err}") from err
        want = {"format": CHECKPOINT_FORMAT, "model": self.model, "first": self.first}
        want["last"] = self.last
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise FailedPrecondition(f"checkpoint is for {got}, not {want}")
        if meta.get("optimizer") != self.settings.optimizer.name:
            raise FailedPrecondition(
                f"checkpoint holds {meta.get('optimizer')} state; this job uses "
                f"{self.settings.optimizer.name}"
            )
        step = meta.get("step")
        if not isinstance(step, int) or step < 0:
            raise InvalidArgument(f"checkpoint step {step!r} is not a step number")
        expected = self.module.state_dict()
        model_keys = {k[len("model.") :] for k in tensors if k.startswith("model.")}
        if model_keys != set(expected):
            odd = sorted(model_keys ^ set(expected))[:5]
            raise InvalidArgument(f"checkpoint tensors {odd} do not match the stage")
        for key, ref in expected.items():
            t = tensors[f"model.{key}"]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise InvalidArgument(f"checkpoint {key} is {t.dtype}{list(t.shape)}")
        with torch.no_grad():
            for key, ref in expected.items():
                ref.copy_(tensors[f"model.{key}"])
        current = self.optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for i, name in enumerate(self.names):
            prefix = f"optim.{name}."
            entries = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entries:
                state[i] = entries
        known = {f"optim.{n}." for n in self.names}
        stray = [
            k for k in tensors if k.startswith("optim.") and not any(k.startswith(p) for p in known)
        ]
        if stray:
            raise InvalidArgument(f"checkpoint optimizer state for unknown parameters {stray[:5]}")
        self.optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
        self.step = step
        self.grads = None
        self.parts = 0
        return step


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError("too short to be safetensors")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("bad safetensors header size")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


class CheckpointStore:
    """Checkpoints on this agent's disk: ``<root>/<tag>/<model>.<first>-<last>.safetensors``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, tag: str, model: str, first: int, last: int) -> Path:
        return self.root / check_tag(tag) / f"{_UNSAFE.sub('_', model)}.{first}-{last}.safetensors"

    def save(self, tag: str, model: str, first: int, last: int, data: bytes) -> tuple[Path, str]:
        path = self.path(tag, model, first, last)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return path, hashlib.sha256(data).hexdigest()

    def load(self, tag: str, model: str, first: int, last: int) -> bytes:
        path = self.path(tag, model, first, last)
        if not path.exists():
            raise NotFound(
                f"no checkpoint {tag!r} of {model}[{first}..{last}] on this agent ({path})"
            )
        return path.read_bytes()
