"""What the coordinator and the agents share to train a model across the fleet.

Schedule: synchronous pipeline with a flush per step (GPipe's semantics). A step's batch is cut
into microbatches that all enter the pipeline at once; each microbatch's backward pass starts
as soon as its loss is known and travels upstream on the same stream's response path; when every
microbatch of the step is done, the replicas of each stage sum their gradients and every stage
applies one optimizer step. Why GPipe rather than 1F1B or an asynchronous schedule:

- the weights never change inside a step, so the summed microbatch gradients ARE the full-batch
  gradient (the loss of each part is scaled by 1 / the whole batch's element count): distributed
  training is the same optimisation as single-process training, not an approximation of it;
- 1F1B reorders the same forward and backward passes to bound the activations held at once: it
  changes memory, not the mathematics. Here a part's activations live exactly as long as its
  handler waits for its gradient, so memory follows the pipeline's fill, bounded by the number
  of microbatches in flight;
- asynchronous schedules (PipeDream's weight stashing) trade that exactness for throughput.

Gradients are summed in the order parts finish, so sums are reproducible to float rounding
(about 1e-7 relative), not bit for bit; replicas stay identical because they all apply the one
sum computed by their group's rank 0.

The data is synthetic and deterministic (``SyntheticData``): nothing is downloaded or shipped.

This module holds the values both sides need (``OptimizerSpec``, ``TrainPart``), the synthetic
data and loss, and the training stream (``TrainLink``, ``train_fan_out``): one bidirectional
``Agent.Forward`` stream per peer, separate from the inference ``PeerLink`` so a training job
and inference traffic never queue behind each other's microbatches.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import grpc
import grpc.aio
import structlog
import torch
import torch.nn.functional as F

from doramesh import models
from doramesh.channels import CHUNK_BYTES, MAX_MESSAGE_BYTES, create_channel
from doramesh.errors import DoraMeshError, InvalidArgument, Unavailable, error_for
from doramesh.models.zoo import check_sample_shape
from doramesh.streams import MAX_TENSOR_BYTES, split_by_shares
from doramesh.tensors import FrameAssembler, iter_frames, tensor_from_pb, tensor_to_pb
from doramesh.tokenbucket import TokenBucket
from doramesh.v1 import agent_pb2, agent_pb2_grpc

_log = structlog.get_logger("training")

OptimizerName = Literal["sgd", "adam", "adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
#: Largest label tensor a training header may carry (it rides in the header message).
MAX_LABEL_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class OptimizerSpec:
    """The optimizer every replica of every stage applies, with torch's semantics.

    ``beta1``, ``beta2`` and ``eps`` of 0 mean torch's defaults (0.9, 0.999, 1e-8).
    """

    name: OptimizerName = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0

    def check(self) -> OptimizerSpec:
        """This spec, or ``InvalidArgument`` naming the field that is wrong."""
        if self.name not in OPTIMIZERS:
            raise InvalidArgument(
                f"optimizer {self.name!r} is not supported; expected one of {', '.join(OPTIMIZERS)}"
            )
        if not (self.lr > 0 and self.lr < float("inf")):
            raise InvalidArgument(f"optimizer.lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise InvalidArgument(f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise InvalidArgument(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        for field_name in ("beta1", "beta2"):
            value = getattr(self, field_name)
            if not 0 <= value < 1:
                raise InvalidArgument(f"optimizer.{field_name} must be in [0, 1), got {value}")
        if not self.eps >= 0:
            raise InvalidArgument(f"optimizer.eps must be >= 0, got {self.eps}")
        return self

    def build(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The torch optimizer over ``params`` (torch's own code, so a single process using
        ``torch.optim`` with the same hyper-parameters takes the same steps)."""
        if self.name == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        betas = (self.beta1 or 0.9, self.beta2 or 0.999)
        eps = self.eps or 1e-8
        if self.name == "adam":
            return torch.optim.Adam(
                params, lr=self.lr, betas=betas, eps=eps, weight_decay=self.weight_decay
            )
        return torch.optim.AdamW(
            params, lr=self.lr, betas=betas, eps=eps, weight_decay=self.weight_decay
        )


def optimizer_to_pb(spec: OptimizerSpec) -> agent_pb2.OptimizerSpec:
    return agent_pb2.OptimizerSpec(
        name=spec.name,
        lr=spec.lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        beta1=spec.beta1,
        beta2=spec.beta2,
        eps=spec.eps,
    )


def optimizer_from_pb(pb: agent_pb2.OptimizerSpec) -> OptimizerSpec:
    """The validated spec; an empty name means SGD."""
    name = pb.name or "sgd"
    if name not in OPTIMIZERS:
        raise InvalidArgument(
            f"optimizer {name!r} is not supported; expected one of {', '.join(OPTIMIZERS)}"
        )
    return OptimizerSpec(
        name=name,  # type: ignore[arg-type]  # checked against OPTIMIZERS just above
        lr=pb.lr,
        momentum=pb.momentum,
        weight_decay=pb.weight_decay,
        beta1=pb.beta1,
        beta2=pb.beta2,
        eps=pb.eps,
    ).check()


# ---------------------------------------------------------------------------------------------
# Synthetic data and the loss


def _step_seed(data_seed: int, step: int) -> int:
    digest = hashlib.sha256(f"doramesh-data:{data_seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def output_shape(model: str, sample_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The per-sample output shape of ``model`` (e.g. ``(1000,)`` or ``(T, vocab)``), found by
    running its skeleton on the meta device: no weights, no compute."""
    spec = models.get_spec(model)
    shape = check_sample_shape(spec, sample_shape)
    net = models.skeleton_blocks(model)
    x = torch.zeros((1, *shape), dtype=spec.input_dtype, device="meta")
    with torch.no_grad():
        y = net(x)
    return tuple(int(d) for d in y.shape[1:])


@dataclass(frozen=True, slots=True)
class SyntheticData:
    """A job's synthetic, deterministic data: the same batches on every host.

    Token models (integer input with a vocabulary): ``T + 1`` uniform token ids per sample; the
    input is the first ``T``, the labels the last ``T`` (next-token prediction). Classifiers:
    standard-normal inputs and uniform labels over the model's outputs. Step ``s`` draws from a
    fresh generator seeded by ``(data_seed, s)``, so a resumed job sees exactly the batches the
    uninterrupted one would have. With ``distinct_batches = N > 0`` the steps cycle over N fixed
    batches: a tiny dataset the model can fit (fresh random labels hold nothing to learn).
    """

    model: str
    data_seed: int
    batch: int
    sample_shape: tuple[int, ...]
    input_dtype: torch.dtype
    #: Token models: the vocabulary; classifiers: the number of classes.
    classes: int
    tokens: bool
    distinct_batches: int = 0

    @classmethod
    def for_model(
        cls,
        model: str,
        data_seed: int,
        batch: int,
        sample_shape: tuple[int, ...] | None = None,
        *,
        distinct_batches: int = 0,
    ) -> SyntheticData:
        spec = models.get_spec(model)
        shape = check_sample_shape(spec, sample_shape)
        if batch < 1:
            raise InvalidArgument(f"batch must be at least 1, got {batch}")
        if distinct_batches < 0:
            raise InvalidArgument(f"distinct_batches must be >= 0, got {distinct_batches}")
        out = output_shape(model, shape)
        if not spec.input_dtype.is_floating_point:
            if spec.vocab_size is None or len(shape) != 1:
                raise InvalidArgument(f"{model}: token input needs a vocab_size and shape [T]")
            if out != (shape[0], spec.vocab_size):
                raise InvalidArgument(f"{model}: output {list(out)} is not per-token logits")
            return cls(
                model,
                data_seed,
                batch,
                shape,
                spec.input_dtype,
                spec.vocab_size,
                True,
                distinct_batches,
            )
        if len(out) != 1:
            raise InvalidArgument(
                f"{model}: output {list(out)} per sample is neither class logits nor token logits"
            )
        return cls(
            model, data_seed, batch, shape, spec.input_dtype, out[0], False, distinct_batches
        )

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``step``'s (inputs, labels); labels are int64."""
        if step < 1:
            raise InvalidArgument(f"steps are numbered from 1, got {step}")
        if self.distinct_batches:
            step = (step - 1) % self.distinct_batches + 1
        g = torch.Generator().manual_seed(_step_seed(self.data_seed, step))
        if self.tokens:
            ids = torch.randint(
                0, self.classes, (self.batch, self.sample_shape[0] + 1), generator=g
            )
            return ids[:, :-1].contiguous().to(self.input_dtype), ids[:, 1:].contiguous()
        x = torch.randn((self.batch, *self.sample_shape), generator=g).to(self.input_dtype)
        return x, torch.randint(0, self.classes, (self.batch,), generator=g)


def part_loss(output: torch.Tensor, labels: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """Cross-entropy of one part, summed and scaled: with ``loss_scale = 1 / elements of the
    whole batch``, the parts' losses (and gradients) add up to the full-batch mean.

    ``output`` is ``[n, C]`` against labels ``[n]``, or ``[n, T, V]`` against ``[n, T]``.
    """
    if output.dim() != labels.dim() + 1 or output.shape[:-1] != labels.shape:
        raise InvalidArgument(
            f"labels of shape {list(labels.shape)} do not fit the last stage's output "
            f"{list(output.shape)}"
        )
    logits = output.reshape(-1, output.shape[-1])
    return F.cross_entropy(logits, labels.reshape(-1), reduction="sum") * loss_scale


# ---------------------------------------------------------------------------------------------
# The training stream


@dataclass(frozen=True, slots=True)
class TrainPart:
    """Samples ``[offset, offset + n)`` of microbatch ``microbatch`` of step ``step``."""

    job_id: str
    step: int
    microbatch: int
    offset: int
    loss_scale: float
    labels: torch.Tensor

    def to_pb(self) -> agent_pb2.TrainPart:
        return agent_pb2.TrainPart(
            job_id=self.job_id,
            step=self.step,
            microbatch=self.microbatch,
            offset=self.offset,
            loss_scale=self.loss_scale,
            labels=tensor_to_pb(self.labels),
        )

    @classmethod
    def from_pb(cls, pb: agent_pb2.TrainPart, batch: int) -> TrainPart:
        """The validated part of a received header whose activation has ``batch`` samples."""
        if not pb.HasField("labels"):
            raise InvalidArgument("training part carries no labels")
        labels = tensor_from_pb(pb.labels, max_bytes=MAX_LABEL_BYTES)
        if labels.dtype != torch.int64:
            raise InvalidArgument(f"labels must be int64, got {labels.dtype}")
        if labels.dim() < 1 or labels.shape[0] != batch:
            raise InvalidArgument(
                f"labels of shape {list(labels.shape)} do not match a part of {batch} samples"
            )
        if not (0 < pb.loss_scale <= 1):
            raise InvalidArgument(f"loss_scale must be in (0, 1], got {pb.loss_scale}")
        if pb.step < 1:
            raise InvalidArgument("training steps are numbered from 1")
        return cls(pb.job_id, pb.step, pb.microbatch, pb.offset, pb.loss_scale, labels)

    def split(self, counts: list[int]) -> list[TrainPart]:
        """This part cut along the batch into consecutive parts of ``counts`` samples."""
        parts = []
        offset = self.offset
        for labels in torch.split(self.labels, counts):
            parts.append(
                TrainPart(
                    self.job_id,
                    self.step,
                    self.microbatch,
                    offset,
                    self.loss_scale,
                    labels.contiguous(),
                )
            )
            offset += labels.shape[0]
        return parts


@dataclass(frozen=True, slots=True)
class PartResult:
    """What comes back for a part: d(loss)/d(the part's input), its loss, the compute time on
    the slowest path below."""

    grad: torch.Tensor
    loss: float
    compute_ms: float


def tagged_frames(
    t: torch.Tensor,
    tag: Callable[[agent_pb2.ActivationHeader], None],
    *,
    stage_id: str,
    plan_epoch: int,
    request_id: str,
    microbatch_id: int,
    compute_ms: float = 0.0,
) -> Iterator[agent_pb2.ActivationFrame]:
    """``iter_frames`` with ``tag`` applied to the header (the message-typed training fields
    that ``iter_frames``' keyword extras cannot carry)."""
    frames = iter_frames(
        t,
        stage_id=stage_id,
        plan_epoch=plan_epoch,
        request_id=request_id,
        microbatch_id=microbatch_id,
        compute_ms=compute_ms,
    )
    head = next(frames)
    tag(head.header)
    yield head
    yield from frames


class TrainLink:
    """Sends training parts to one peer's stage over one stream and awaits their gradients.

    Like ``doramesh.streams.PeerLink`` (one bidirectional ``Agent.Forward`` stream per peer,
    parts multiplexed by a link-local id, paced by the flow's token bucket), but a request
    carries its ``TrainPart`` and an answer carries the loss. A broken stream fails every part
    in flight with ``Unavailable``; the next send opens a fresh stream.
    """

    def __init__(
        self,
        address: str,
        *,
        bucket: TokenBucket | None = None,
        max_tensor_bytes: int = MAX_TENSOR_BYTES,
    ) -> None:
        self.address = address
        self.bucket = bucket
        self._max_tensor_bytes = max_tensor_bytes
        self._channel: grpc.aio.Channel | None = None
        self._call: (
            grpc.aio.StreamStreamCall[agent_pb2.ActivationFrame, agent_pb2.ActivationFrame] | None
        ) = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[PartResult]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self.bytes_sent = 0

    async def _ensure_open(
        self,
    ) -> grpc.aio.StreamStreamCall[agent_pb2.ActivationFrame, agent_pb2.ActivationFrame]:
        async with self._open_lock:
            if self._call is not None and not self._call.done():
                return self._call
            if self._channel is None:
                self._channel = create_channel(self.address, max_message_bytes=MAX_MESSAGE_BYTES)
            call = agent_pb2_grpc.AgentStub(self._channel).Forward(wait_for_ready=False)
            self._call = call
            self._reader = asyncio.create_task(self._read(call))
            return call

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall[agent_pb2.ActivationFrame, agent_pb2.ActivationFrame],
    ) -> None:
        assembler = FrameAssembler(self._max_tensor_bytes, max_chunk_bytes=CHUNK_BYTES)
        failure: DoraMeshError
        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    failure = Unavailable(f"peer {self.address} closed the training stream")
                    break
                if frame.HasField("header") and frame.header.error:
                    fut = self._pending.pop(frame.header.microbatch_id, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(error_for(frame.header.error_code, frame.header.error))
                    continue
                done = assembler.feed(frame)
                if done is None:
                    continue
                header, grad = done
                fut = self._pending.pop(header.microbatch_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(PartResult(grad, header.loss, header.compute_ms))
        except grpc.aio.AioRpcError as err:
            failure = error_for(err.code(), f"training stream to {self.address}: {err.details()}")
            if err.code() == grpc.StatusCode.CANCELLED:
                failure = Unavailable(f"training stream to {self.address} cancelled")
        except DoraMeshError as err:
            failure = err
            call.cancel()
        except asyncio.CancelledError:
            self._fail_all(Unavailable(f"training stream to {self.address} closed"))
            raise
        self._fail_all(failure)

    def _fail_all(self, err: DoraMeshError) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    async def send(
        self,
        x: torch.Tensor,
        part: TrainPart,
        *,
        stage_id: str,
        plan_epoch: int,
        timeout: float | None = None,
    ) -> PartResult:
        """Run ``part`` (input ``x``) through the peer's stage and everything below it; return
        the gradient of the loss with respect to ``x`` and the part's loss."""
        call = await self._ensure_open()
        mb_id = next(self._ids)
        fut: asyncio.Future[PartResult] = asyncio.get_running_loop().create_future()
        self._pending[mb_id] = fut
        part_pb = part.to_pb()

        def tag(header: agent_pb2.ActivationHeader) -> None:
            header.train.CopyFrom(part_pb)

        try:
            async with self._write_lock:
                for frame in tagged_frames(
                    x,
                    tag,
                    stage_id=stage_id,
                    plan_epoch=plan_epoch,
                    request_id=f"{part.job_id}/{part.step}/{part.microbatch}",
                    microbatch_id=mb_id,
                ):
                    if self.bucket is not None and frame.HasField("chunk"):
                        await self.bucket.acquire(len(frame.chunk.data))
                    await call.write(frame)
                    if frame.HasField("chunk"):
                        self.bytes_sent += len(frame.chunk.data)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
            self._pending.pop(mb_id, None)
            raise Unavailable(f"could not send to {self.address}: {err}") from err
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(mb_id, None)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        if self._channel is not None:
            await self._channel.close()
        self._call = self._channel = self._reader = None


@dataclass(frozen=True, slots=True)
class TrainReplica:
    """One data-parallel replica of the next stage, reached through a training link."""

    link: TrainLink
    stage_id: str
    share: float


async def train_fan_out(
    replicas: list[TrainReplica],
    x: torch.Tensor,
    part: TrainPart,
    *,
    plan_epoch: int,
    timeout: float | None = None,
) -> PartResult:
    """Send a part to a stage's replicas, split along the batch by their shares (labels too),
    and gather the gradients in order; the losses add up (in replica order)."""
    if len(replicas) == 1:
        only = replicas[0]
        return await only.link.send(
            x, part, stage_id=only.stage_id, plan_epoch=plan_epoch, timeout=timeout
        )
    counts = split_by_shares(x.shape[0], [r.share for r in replicas])
    sends = [
        r.link.send(
            xs.contiguous(), ps, stage_id=r.stage_id, plan_epoch=plan_epoch, timeout=timeout
        )
        for r, xs, ps, n in zip(
            replicas, torch.split(x, counts), part.split(counts), counts, strict=True
        )
        if n > 0
    ]
    results = await asyncio.gather(*sends)
    loss = 0.0
    for result in results:
        loss += result.loss
    grads = [result.grad for result in results]
    grad = torch.cat(grads) if any(g.numel() for g in grads) else grads[0]
    return PartResult(grad, loss, max(result.compute_ms for result in results))
