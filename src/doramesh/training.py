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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import structlog
import torch
import torch.nn.functional as F

from doramesh import models
from doramesh.errors import InvalidArgument
from doramesh.models.zoo import check_sample_shape
from doramesh.streams import MAX_TENSOR_BYTES, PeerLink, split_by_shares
from doramesh.tensors import iter_frames, tensor_from_pb, tensor_to_pb
from doramesh.tokenbucket import TokenBucket
from doramesh.v1 import agent_pb2

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
    """Sends training parts to one peer's stage and awaits their gradients.

    A ``PeerLink`` underneath (one bidirectional ``Agent.Forward`` stream per peer, parts
    multiplexed by a link-local id, paced by the flow's token bucket): a request's header
    carries its ``TrainPart``, an answer's carries the loss. A broken stream fails every part in
    flight with ``Unavailable``; the next send opens a fresh stream.
    """

    def __init__(
        self,
        address: str,
        *,
        bucket: TokenBucket | None = None,
        max_tensor_bytes: int = MAX_TENSOR_BYTES,
    ) -> None:
        self.address = address
        self._link = PeerLink(address, bucket=bucket, max_tensor_bytes=max_tensor_bytes)

    @property
    def bytes_sent(self) -> int:
        return self._link.bytes_sent

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
        part_pb = part.to_pb()

        def tag(header: agent_pb2.ActivationHeader) -> None:
            header.train.CopyFrom(part_pb)

        header, grad = await self._link.exchange(
            x,
            stage_id=stage_id,
            plan_epoch=plan_epoch,
            request_id=f"{part.job_id}/{part.step}/{part.microbatch}",
            timeout=timeout,
            tag=tag,
        )
        return PartResult(grad, header.loss, header.compute_ms)

    async def close(self) -> None:
        await self._link.close()


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
