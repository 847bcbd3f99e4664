"""A persistent activation stream to one peer agent.

Both the coordinator (feeding stage 0) and every agent (feeding its next stage) talk to a peer
through a ``PeerLink``: one bidirectional ``Agent.Forward`` stream per peer, many microbatches
multiplexed over it. Each microbatch gets a link-local id; the peer answers with the pipeline's
final result for that id. Outgoing chunks are paced by the flow's token bucket. When the stream
breaks (the peer died, a partition), every microbatch in flight fails with ``Unavailable`` and
the next send opens a fresh stream: replaying the work is the caller's decision.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import grpc.aio
import structlog
import torch

from doramesh.channels import CHUNK_BYTES, MAX_MESSAGE_BYTES, create_channel
from doramesh.errors import DoraMeshError, Unavailable, error_for
from doramesh.tensors import FrameAssembler, iter_frames
from doramesh.tokenbucket import TokenBucket
from doramesh.v1 import agent_pb2, agent_pb2_grpc

_log = structlog.get_logger("streams")

#: The largest tensor a stream accepts (the final result of a pipeline, e.g. LLM logits).
MAX_TENSOR_BYTES = 1 << 30


#: A peer's answer to one microbatch: its header (compute time, a training loss) and tensor.
Answer = tuple[agent_pb2.ActivationHeader, torch.Tensor]


@dataclass(frozen=True, slots=True)
class StageResult:
    tensor: torch.Tensor
    compute_ms: float


class PeerLink:
    """Sends tensors to one peer's stage over a shared stream and awaits their results."""

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
        self._pending: dict[
            int, asyncio.Future[tuple[agent_pb2.ActivationHeader, torch.Tensor]]
        ] = {}
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
            stub = agent_pb2_grpc.AgentStub(self._channel)
            call = stub.Forward(wait_for_ready=False)
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
                    failure = Unavailable(f"peer {self.address} closed the stream")
                    break
                if frame.HasField("header") and frame.header.error:
                    fut = self._pending.pop(frame.header.microbatch_id, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(error_for(frame.header.error_code, frame.header.error))
                    continue
                done = assembler.feed(frame)
                if done is None:
                    continue
                header, tensor = done
                fut = self._pending.pop(header.microbatch_id, None)
                if fut is not None and not fut.done():
                    fut.set_result((header, tensor))
        except grpc.aio.AioRpcError as err:
            failure = error_for(err.code(), f"stream to {self.address}: {err.details()}")
            if err.code() == grpc.StatusCode.CANCELLED:
                failure = Unavailable(f"stream to {self.address} cancelled")
        except DoraMeshError as err:
            failure = err
            call.cancel()
        except asyncio.CancelledError:
            failure = Unavailable(f"stream to {self.address} closed")
            self._fail_all(failure)
            raise
        self._fail_all(failure)

    def _fail_all(self, err: DoraMeshError) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    async def send(
        self,
        tensor: torch.Tensor,
        *,
        stage_id: str,
        plan_epoch: int,
        request_id: str = "",
        timeout: float | None = None,
    ) -> StageResult:
        """Send one microbatch to the peer's stage; return the pipeline's result for it."""
        header, result = await self.exchange(
            tensor,
            stage_id=stage_id,
            plan_epoch=plan_epoch,
            request_id=request_id,
            timeout=timeout,
        )
        return StageResult(result, header.compute_ms)

    async def exchange(
        self,
        tensor: torch.Tensor,
        *,
        stage_id: str,
        plan_epoch: int,
        request_id: str = "",
        timeout: float | None = None,
        tag: Callable[[agent_pb2.ActivationHeader], None] | None = None,
    ) -> Answer:
        """Send ``tensor`` (its header completed by ``tag``, e.g. with a training part) and
        return the answer's header and tensor."""
        call = await self._ensure_open()
        mb_id = next(self._ids)
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[mb_id] = fut
        try:
            async with self._write_lock:
                for frame in iter_frames(
                    tensor,
                    stage_id=stage_id,
                    plan_epoch=plan_epoch,
                    request_id=request_id,
                    microbatch_id=mb_id,
                ):
                    if frame.HasField("header") and tag is not None:
                        tag(frame.header)
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
class Replica:
    """One data-parallel replica of a stage, reached through a link."""

    link: PeerLink
    stage_id: str
    share: float


def split_by_shares(batch: int, shares: list[float]) -> list[int]:
    """Samples per replica: proportional to shares, summing to ``batch`` (largest remainder).

    A replica may get zero samples when the batch is smaller than the group.
    """
    total = sum(shares)
    if batch <= 0 or total <= 0:
        return [0] * len(shares)
    exact = [batch * s / total for s in shares]
    counts = [int(e) for e in exact]
    order = sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: batch - sum(counts)]:
        counts[i] += 1
    return counts


async def fan_out(
    replicas: list[Replica],
    tensor: torch.Tensor,
    *,
    plan_epoch: int,
    request_id: str,
    timeout: float | None = None,
) -> StageResult:
    """Send a microbatch to a stage's replicas, split along the batch by their shares, and
    gather their results in order. One replica: no split, no copy."""
    if len(replicas) == 1:
        r = replicas[0]
        return await r.link.send(
            tensor,
            stage_id=r.stage_id,
            plan_epoch=plan_epoch,
            request_id=request_id,
            timeout=timeout,
        )
    counts = split_by_shares(tensor.shape[0], [r.share for r in replicas])
    parts = torch.split(tensor, counts)
    sends = [
        r.link.send(
            part.contiguous(),
            stage_id=r.stage_id,
            plan_epoch=plan_epoch,
            request_id=request_id,
            timeout=timeout,
        )
        for r, part, n in zip(replicas, parts, counts, strict=True)
        if n > 0
    ]
    results = await asyncio.gather(*sends)
    return StageResult(torch.cat([r.tensor for r in results]), max(r.compute_ms for r in results))
