"""A persistent activation stream to one peer agent.

Both the coordinator (feeding stage 0) and every agent (feeding its next stage) talk to a peer
through a ``PeerLink``: one bidirectional ``Agent.Forward`` stream per peer, many microbatches
multiplexed over it. Each microbatch gets a link-local id; the peer answers with the pipeline's
final result for that id. Outgoing chunks are paced by the flow's token bucket. When the stream
breaks (the peer died, a partition), every microbatch in flight fails with ``Unavailable`` and
the next send opens a fresh stream: replaying the work is the caller's decision.

Both ends of ``Forward`` use the frame codec of ``doramesh.tensors`` (``encode_frame`` /
``decode_frame``) instead of protobuf's objects, so a tensor's bytes are copied once on their way
out and once on their way in; the bytes on the wire are the same ``ActivationFrame`` messages.
``PeerLink`` opens the stream with that codec and ``add_agent_servicer`` registers the agent's
servicer with it.

A frame carries up to ``FRAME_BYTES`` of a tensor, the header frame included, so a tensor of up
to 1 MiB is one message and its answer another (it was a header, a chunk and an answer): grpc.aio
pays per message (a completion-queue event and an event-loop wake-up on each side for every write
and every read, and a write starts only once the previous one completed). Frames of 4 MiB were
measured too (``doramesh bench transport``, alternating runs) and cost no less CPU per byte than
1 MiB ones, on the stream or on bare gRPC, while gRPC buffers a whole message per stream on each
side; so a frame stays 1 MiB. A paced flow's frames are cut to its burst instead.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import structlog
import torch

from doramesh.channels import CHUNK_BYTES, MAX_MESSAGE_BYTES, create_channel
from doramesh.errors import DoraMeshError, Unavailable, error_for
from doramesh.tensors import (
    Frame,
    FrameAssembler,
    HeaderFrame,
    decode_frame,
    encode_frame,
    frame_header,
    iter_wire_frames,
)
from doramesh.tokenbucket import TokenBucket
from doramesh.v1 import agent_pb2, agent_pb2_grpc

_log = structlog.get_logger("streams")

#: The largest tensor a stream accepts (the final result of a pipeline, e.g. LLM logits).
MAX_TENSOR_BYTES = 1 << 30
#: Most tensor bytes one frame of an activation stream carries (the module docstring says why).
FRAME_BYTES = CHUNK_BYTES


_AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
#: The method path of ``Agent.Forward``, the activation stream.
FORWARD_METHOD = f"/{_AGENT_SERVICE}/Forward"


class _ForwardCodecServer:
    """Stands in for a server while the generated code registers the Agent service, and swaps
    ``Forward``'s protobuf codec for the frame codec."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    @staticmethod
    def _swap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method not in ("Forward", FORWARD_METHOD) or handler.stream_stream is None:
            return handler
        return grpc.stream_stream_rpc_method_handler(
            handler.stream_stream,
            request_deserializer=decode_frame,
            response_serializer=encode_frame,
        )

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        swap = self._swap

        class Swapped(grpc.GenericRpcHandler):
            def __init__(self, inner: grpc.GenericRpcHandler) -> None:
                self._inner = inner

            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                handler = self._inner.service(details)
                return None if handler is None else swap(details.method, handler)

        self._server.add_generic_rpc_handlers([Swapped(h) for h in handlers])

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._swap(name, h) for name, h in handlers.items()}
        )


def add_agent_servicer(servicer: agent_pb2_grpc.AgentServicer, server: grpc.aio.Server) -> None:
    """``add_AgentServicer_to_server``, with ``Forward`` on the frame codec: its handler receives
    ``Frame`` values (chunks as views) and may yield ``ChunkFrame`` values."""
    agent_pb2_grpc.add_AgentServicer_to_server(servicer, _ForwardCodecServer(server))


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
        chunk_bytes: int = FRAME_BYTES,
    ) -> None:
        if not 0 < chunk_bytes <= FRAME_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {FRAME_BYTES}], not {chunk_bytes}")
        self.address = address
        self.bucket = bucket
        self._chunk_bytes = chunk_bytes
        self._max_tensor_bytes = max_tensor_bytes
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall[Frame, Frame] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[
            int, asyncio.Future[tuple[agent_pb2.ActivationHeader, torch.Tensor]]
        ] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self.bytes_sent = 0

    async def _ensure_open(self) -> grpc.aio.StreamStreamCall[Frame, Frame]:
        async with self._open_lock:
            if self._call is not None and not self._call.done():
                return self._call
            if self._channel is None:
                self._channel = create_channel(self.address, max_message_bytes=MAX_MESSAGE_BYTES)
            forward = self._channel.stream_stream(
                FORWARD_METHOD,
                request_serializer=encode_frame,
                response_deserializer=decode_frame,
            )
            call: grpc.aio.StreamStreamCall[Frame, Frame] = forward(wait_for_ready=False)
            self._call = call
            self._reader = asyncio.create_task(self._read(call))
            return call

    async def _read(self, call: grpc.aio.StreamStreamCall[Frame, Frame]) -> None:
        assembler = FrameAssembler(self._max_tensor_bytes, max_chunk_bytes=FRAME_BYTES)
        failure: DoraMeshError
        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    failure = Unavailable(f"peer {self.address} closed the stream")
                    break
                header = frame_header(frame)
                if header is not None and header.error:
                    fut = self._pending.pop(header.microbatch_id, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(error_for(header.error_code, header.error))
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
        chunk_bytes = self._chunk_bytes
        if self.bucket is not None and not self.bucket.unlimited:
            # A paced flow never writes more than one burst at once: a chunk larger than the
            # burst would hold the medium for longer than the scheduler allowed it to.
            chunk_bytes = max(1, min(chunk_bytes, int(self.bucket.burst)))
        try:
            async with self._write_lock:
                for frame in iter_wire_frames(
                    tensor,
                    stage_id=stage_id,
                    plan_epoch=plan_epoch,
                    request_id=request_id,
                    microbatch_id=mb_id,
                    chunk_bytes=chunk_bytes,
                ):
                    if tag is not None and isinstance(frame, HeaderFrame):
                        tag(frame.header)
                    size = len(frame.data)
                    if size and self.bucket is not None:
                        await self.bucket.acquire(size)
                    await call.write(frame)
                    self.bytes_sent += size
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
            self._pending.pop(mb_id, None)
            # The reader may already have failed this microbatch's future; the send error
            # below is the one reported, so mark that one retrieved (asyncio would log it).
            if fut.done() and not fut.cancelled():
                fut.exception()
            else:
                fut.cancel()
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


class _Rotation:
    """Smooth weighted round robin over a stage's replicas, one sample at a time, kept across
    microbatches: over many microbatches each replica gets its share of the samples, also when
    a microbatch is smaller than the group (batch-1 requests alternate between two replicas
    instead of all going to the first, as a fresh largest-remainder split per microbatch did).
    """

    #: Groups remembered at most (a deployment has a handful; re-plans make new ones).
    MAX_GROUPS = 1024
    _groups: dict[tuple[tuple[int, str], ...], list[float]] = {}

    @classmethod
    def counts(cls, replicas: Sequence[Replica], batch: int) -> list[int]:
        weights = [max(0.0, r.share) for r in replicas]
        total = sum(weights)
        if batch <= 0 or total <= 0:
            return [0] * len(replicas)
        key = tuple((id(r.link), r.stage_id) for r in replicas)
        current = cls._groups.get(key)
        if current is None:
            if len(cls._groups) >= cls.MAX_GROUPS:
                cls._groups.clear()
            current = cls._groups[key] = [0.0] * len(replicas)
        counts = [0] * len(replicas)
        for _ in range(batch):
            for i, w in enumerate(weights):
                current[i] += w
            pick = max(range(len(weights)), key=current.__getitem__)
            current[pick] -= total
            counts[pick] += 1
        return counts


async def fan_out(
    replicas: list[Replica],
    tensor: torch.Tensor,
    *,
    plan_epoch: int,
    request_id: str,
    timeout: float | None = None,
) -> StageResult:
    """Send a microbatch to a stage's replicas, split along the batch by their shares (kept
    across microbatches, :class:`_Rotation`), and gather their results in order. One replica:
    no split, no copy."""
    if len(replicas) == 1:
        r = replicas[0]
        return await r.link.send(
            tensor,
            stage_id=r.stage_id,
            plan_epoch=plan_epoch,
            request_id=request_id,
            timeout=timeout,
        )
    counts = _Rotation.counts(replicas, tensor.shape[0])
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
