"""The tensor codec: torch tensors to and from raw bytes plus validated dtype and shape.

Nothing remote is unpickled. A tensor travels as ``TensorMeta`` (dtype name, shape, byte length)
and little-endian, C-order bytes; a receiver checks the metadata against its limits before it
allocates anything, and checks the bytes against the metadata before it builds a tensor. Every
refusal is an ``InvalidArgument`` (malformed) or ``ResourceExhausted`` (too big, too many), which
servicers turn into a gRPC status, so a bad peer costs one stream, never the process.

Large activations travel as frames (``iter_wire_frames``): a header carrying the tensor's first
bytes, then chunks with the rest, so a tensor of up to one frame is one message; they are put back
together by ``FrameAssembler``. The tensor bytes are the bulk of every byte on the wire, so they
do not go through protobuf's objects: ``HeaderFrame`` and ``ChunkFrame`` hold views of the
tensor's memory, ``encode_frame`` writes the ``ActivationFrame`` wire format around them with one
copy, and ``decode_frame`` hands the assembler a view of the received message, which it copies
once into the buffer allocated when the header arrived. Through protobuf's objects the same bytes
cost four copies on each side (slice to bytes, into the message, serialised; parsed, read out of
the message), which left gRPC streaming at a fifth of a raw socket's rate. The wire format is
protobuf's: any protobuf peer reads and writes these frames, and ``decode_frame`` parses whatever
is not plainly encoded with protobuf itself.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from google.protobuf.message import DecodeError

from doramesh.channels import CHUNK_BYTES
from doramesh.errors import InvalidArgument, ResourceExhausted
from doramesh.v1 import agent_pb2, common_pb2

# The wire format is little-endian and the codec hands tensor memory to the wire as is. Every
# device doramesh targets (x86-64, ARM phones, Jetsons, Raspberry Pis) is little-endian; refusing
# to load elsewhere is better than silently sending byte-swapped activations.
if sys.byteorder != "little":  # pragma: no cover - no big-endian target exists
    raise ImportError("doramesh.tensors supports little-endian hosts only")

#: The wire names of the dtypes doramesh carries. Complex and quantized types are left out on
#: purpose: no model in the zoo exchanges them, and every name here is a name a peer must accept.
DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
        "int64": torch.int64,
        "int32": torch.int32,
        "int16": torch.int16,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }
)
_NAMES: Mapping[torch.dtype, str] = MappingProxyType({v: k for k, v in DTYPES.items()})
_EXPECTED_NAMES = ", ".join(sorted(DTYPES))

#: Most dimensions a received tensor may have. Activations have at most 4 or 5; the bound keeps a
#: hostile shape from costing time and keeps error messages short.
MAX_DIMS = 8
#: torch sizes, strides and byte counts are int64.
_INT64_MAX = (1 << 63) - 1


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: The largest mmap threshold glibc accepts on 64-bit hosts.
_GLIBC_MAX_MMAP_THRESHOLD = 32 << 20


def tune_allocator_for_streaming(*, retain_bytes: int = 256 << 20) -> bool:
    """Makes glibc reuse freed megabyte buffers instead of returning them to the kernel.

    Streaming activations allocates and frees a buffer of about a chunk (gRPC's receive slices,
    protobuf's bytes, each chunk's copy) or a tensor (the receiver's buffer) per message. With
    glibc's defaults these are mmap'ed and unmapped or trimmed each time, and touching fresh pages
    costs more than the copies themselves: on a 2-vCPU loopback host it halved gRPC's streaming
    rate (see ``doramesh bench transport``). Serving allocations below 32 MiB from the heap and
    keeping up to ``retain_bytes`` of freed heap removes most of those page faults, at the price
    of that much resident memory. Process-wide, so call it once at the start of a process that
    streams tensors (the agent daemon). Returns False where it does not apply (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # musl and other libcs export a mallopt that does nothing and returns 0.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, min(retain_bytes, (1 << 31) - 1))
    )


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; ``InvalidArgument`` for a dtype the wire does not carry."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise InvalidArgument(
            f"dtype {dtype} cannot be sent; expected one of {_EXPECTED_NAMES}"
        ) from None


def meta_of(t: torch.Tensor) -> common_pb2.TensorMeta:
    """The wire metadata of ``t`` (its bytes are ``numel * itemsize``, C order)."""
    return common_pb2.TensorMeta(
        dtype=dtype_name(t.dtype),
        shape=list(t.shape),
        byte_length=t.numel() * t.element_size(),
    )


def _byte_view(t: torch.Tensor) -> memoryview:
    """A flat, read-only view of ``t``'s bytes in C order, without copying when it can.

    A tensor on an accelerator, or a non-contiguous one, is copied once (unavoidable); a
    contiguous CPU tensor is viewed in place. Viewing as uint8 is how bfloat16, which numpy
    lacks, gets to bytes. The caller must not modify ``t`` while the view is in use.
    """
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.toreadonly()


def tensor_to_pb(t: torch.Tensor) -> common_pb2.Tensor:
    """``t`` as one message (client API, small tensors); large tensors go by ``iter_frames``."""
    meta = meta_of(t)
    return common_pb2.Tensor(meta=meta, data=_byte_view(t).tobytes())


def validate_meta(
    meta: common_pb2.TensorMeta,
    *,
    max_bytes: int,
    expect_shape: tuple[int | None, ...] | None = None,
    expect_dtype: str | None = None,
) -> tuple[torch.dtype, tuple[int, ...]]:
    """Checks received metadata before anything is allocated; returns the dtype and shape.

    ``expect_shape`` may hold ``None`` for a free dimension (e.g. the batch). Malformed or
    unexpected metadata raises ``InvalidArgument``; a tensor over ``max_bytes`` raises
    ``ResourceExhausted``.
    """
    dtype = DTYPES.get(meta.dtype)
    if dtype is None:
        raise InvalidArgument(f"unknown dtype {meta.dtype!r}; expected one of {_EXPECTED_NAMES}")
    if expect_dtype is not None and meta.dtype != expect_dtype:
        raise InvalidArgument(f"dtype {meta.dtype!r} does not match the expected {expect_dtype!r}")
    if len(meta.shape) > MAX_DIMS:
        raise InvalidArgument(
            f"tensor has {len(meta.shape)} dimensions; at most {MAX_DIMS} are accepted"
        )
    shape = tuple(int(d) for d in meta.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"shape {list(shape)} has a negative dimension")
    itemsize = dtype.itemsize
    numel = 1
    # torch computes strides from the non-zero sizes, so a shape like (0, 2**62, 2**62) holds no
    # element yet still cannot be built; bounding this product keeps every later step in int64.
    span = itemsize
    for d in shape:
        numel *= d
        span *= max(d, 1)
        if span > _INT64_MAX:
            raise InvalidArgument(f"shape {list(shape)} overflows a 64-bit element count")
    expected_bytes = numel * itemsize
    if meta.byte_length != expected_bytes:
        raise InvalidArgument(
            f"byte_length {meta.byte_length} does not match shape {list(shape)} of {meta.dtype}: "
            f"expected {expected_bytes} bytes ({numel} elements x {itemsize} bytes)"
        )
    if expected_bytes > max_bytes:
        raise ResourceExhausted(
            f"tensor of {expected_bytes} bytes exceeds the {max_bytes}-byte limit"
        )
    if expect_shape is not None and (
        len(expect_shape) != len(shape)
        or any(e is not None and e != d for e, d in zip(expect_shape, shape, strict=True))
    ):
        wanted = ", ".join("*" if e is None else str(e) for e in expect_shape)
        raise InvalidArgument(f"shape {list(shape)} does not match the expected [{wanted}]")
    return dtype, shape


def _allocate(byte_length: int) -> tuple[torch.Tensor, memoryview]:
    """An uninitialised byte tensor the receiver owns, and a writable view to copy chunks into.

    ``torch.empty`` rather than ``bytearray(n)``: the bytes are overwritten anyway, so zero-filling
    them first would be a wasted pass over the largest buffers in the system.
    """
    try:
        raw = torch.empty(byte_length, dtype=torch.uint8)
    except (RuntimeError, MemoryError) as err:
        # Within the limits yet more than this host can map now (strict overcommit, a small
        # device): the sender asked too much, which must not surface as an untyped error.
        raise ResourceExhausted(f"cannot allocate {byte_length} bytes for a tensor") from err
    return raw, raw.numpy().data


def _finish(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Reinterprets received bytes as ``dtype`` and ``shape``."""
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        # A peer may send any byte in a bool tensor; torch assumes 0 or 1, so normalise (masks are
        # small, the copy is cheap) rather than hand out a tensor with undefined behaviour.
        return raw.ne(0).reshape(shape)
    return raw.view(dtype).reshape(shape)


def tensor_from_pb(msg: common_pb2.Tensor, *, max_bytes: int) -> torch.Tensor:
    """The tensor in ``msg``, validated; it owns its memory (no view of the message)."""
    dtype, shape = validate_meta(msg.meta, max_bytes=max_bytes)
    data = msg.data
    if len(data) != msg.meta.byte_length:
        raise InvalidArgument(
            f"tensor data has {len(data)} bytes but its meta says {msg.meta.byte_length}"
        )
    raw, view = _allocate(len(data))
    view[:] = data
    return _finish(raw, dtype, shape)


@dataclass(frozen=True, slots=True)
class ChunkFrame:
    """An ``ActivationFrame`` of kind ``chunk`` whose bytes are a view, not a copy.

    Outgoing, ``data`` views the sent tensor's memory; incoming, it views the received message.
    Either way it is only valid while that memory is: the assembler copies it out at once.
    """

    microbatch_id: int
    offset: int
    data: memoryview | bytes

    def to_pb(self) -> agent_pb2.ActivationFrame:
        """The same frame as a protobuf message (a copy of the bytes)."""
        frame = agent_pb2.ActivationFrame()
        chunk = frame.chunk
        chunk.microbatch_id = self.microbatch_id
        chunk.offset = self.offset
        chunk.data = bytes(self.data)
        return frame


@dataclass(frozen=True, slots=True)
class HeaderFrame:
    """An ``ActivationFrame`` of kind ``header`` whose tensor bytes (``data``, the tensor's first
    bytes) are a view, not a copy; valid only while the viewed memory is, as ``ChunkFrame``."""

    header: agent_pb2.ActivationHeader
    data: memoryview | bytes = b""

    def to_pb(self) -> agent_pb2.ActivationFrame:
        """The same frame as a protobuf message (a copy of the bytes)."""
        return agent_pb2.ActivationFrame(header=self.header, data=bytes(self.data))


#: What travels on an activation stream: a protobuf frame (error answers, and frames from peers
#: that build them with protobuf) or a header or chunk whose tensor bytes are a view.
Frame = agent_pb2.ActivationFrame | HeaderFrame | ChunkFrame


def frame_header(frame: Frame) -> agent_pb2.ActivationHeader | None:
    """The header ``frame`` carries; None for a chunk."""
    if isinstance(frame, HeaderFrame):
        return frame.header
    if isinstance(frame, ChunkFrame) or frame.WhichOneof("kind") != "header":
        return None
    return frame.header


# Wire tags (field number << 3 | wire type) of ActivationFrame's fields and ActivationChunk's.
_TAG_HEADER = 0x0A
_TAG_CHUNK = 0x12
_TAG_FRAME_DATA = 0x1A
_TAG_MICROBATCH = 0x08
_TAG_OFFSET = 0x10
_TAG_DATA = 0x1A
_UINT64_LIMIT = 1 << 64


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """The varint at ``pos`` and the position after it; None if it is malformed or not uint64."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, pos) if value < _UINT64_LIMIT else None
        shift += 7
    return None


def encode_frame(frame: Frame) -> bytes:
    """The ``ActivationFrame`` wire bytes of ``frame``: a header or chunk's tensor bytes are
    copied once, after a few bytes of framing built by hand (the header itself is serialised by
    protobuf); a protobuf frame is serialised as usual. The fields are written in field order,
    as protobuf does, so the output is what protobuf would write."""
    if isinstance(frame, HeaderFrame):
        header = frame.header.SerializeToString()
        prefix = b"\x0a" + _varint(len(header)) + header
        if not frame.data:
            return prefix
        return b"".join((prefix, b"\x1a", _varint(len(frame.data)), frame.data))
    if not isinstance(frame, ChunkFrame):
        return frame.SerializeToString()
    inner = bytearray()
    if frame.microbatch_id:
        inner += b"\x08" + _varint(frame.microbatch_id)
    if frame.offset:
        inner += b"\x10" + _varint(frame.offset)
    size = len(frame.data)
    if size:
        inner += b"\x1a" + _varint(size)
    prefix = b"\x12" + _varint(len(inner) + size) + bytes(inner)
    return b"".join((prefix, frame.data))


def _decode_chunk(buf: bytes) -> ChunkFrame | None:
    """``buf`` as a chunk if it is a chunk frame encoded the plain way (the fields once each, in
    order, as every protobuf encoder writes them); None for anything else."""
    end = len(buf)
    if end < 2 or buf[0] != _TAG_CHUNK:
        return None
    got = _read_varint(buf, 1, end)
    if got is None or got[0] != end - got[1]:
        return None
    pos = got[1]
    microbatch_id = offset = 0
    if pos < end and buf[pos] == _TAG_MICROBATCH:
        got = _read_varint(buf, pos + 1, end)
        if got is None:
            return None
        microbatch_id, pos = got
    if pos < end and buf[pos] == _TAG_OFFSET:
        got = _read_varint(buf, pos + 1, end)
        if got is None:
            return None
        offset, pos = got
    if pos >= end or buf[pos] != _TAG_DATA:
        return None
    got = _read_varint(buf, pos + 1, end)
    if got is None or got[0] != end - got[1]:
        return None
    return ChunkFrame(microbatch_id, offset, memoryview(buf)[got[1] :])


def _decode_header(buf: bytes) -> HeaderFrame | None:
    """``buf`` as a header frame if it is one encoded the plain way (the header, then its
    tensor bytes if any); None for anything else. The header itself is parsed by protobuf, which
    raises ``DecodeError`` if it is malformed."""
    end = len(buf)
    if end < 2 or buf[0] != _TAG_HEADER:
        return None
    got = _read_varint(buf, 1, end)
    if got is None or got[0] > end - got[1]:
        return None
    start, header_end = got[1], got[1] + got[0]
    data: memoryview | bytes = b""
    if header_end < end:
        if buf[header_end] != _TAG_FRAME_DATA:
            return None
        got = _read_varint(buf, header_end + 1, end)
        if got is None or got[0] != end - got[1]:
            return None
        data = memoryview(buf)[got[1] :]
    header = agent_pb2.ActivationHeader.FromString(buf[start:header_end])
    return HeaderFrame(header, data)


def decode_frame(buf: bytes) -> Frame:
    """An activation frame from its wire bytes: a header or chunk with its tensor bytes as a
    view of ``buf``, anything else parsed by protobuf; malformed bytes raise ``InvalidArgument``.

    As ``Forward``'s deserializer its error reaches the servicer's request iterator, so it must
    be a ``DoraMeshError``: protobuf's ``DecodeError`` escaped the stream's error handling and
    left the stream open with nobody reading it."""
    chunk = _decode_chunk(buf)
    if chunk is not None:
        return chunk
    try:
        header = _decode_header(buf)
    except DecodeError as err:
        raise InvalidArgument(f"malformed activation header ({len(buf)} bytes): {err}") from None
    if header is not None:
        return header
    try:
        return agent_pb2.ActivationFrame.FromString(buf)
    except DecodeError as err:
        raise InvalidArgument(f"malformed activation frame ({len(buf)} bytes): {err}") from None


def iter_wire_frames(
    t: torch.Tensor,
    *,
    stage_id: str,
    plan_epoch: int,
    request_id: str,
    microbatch_id: int,
    chunk_bytes: int = CHUNK_BYTES,
    **header_extra: str | int | float,
) -> Iterator[HeaderFrame | ChunkFrame]:
    """One microbatch's frames: a header with the first ``chunk_bytes`` of the tensor, then
    chunks covering the rest in order, ``chunk_bytes`` each.

    Tensor bytes are views of the tensor's memory (nothing is copied until ``encode_frame``), so
    ``t`` must not be modified until the iterator is exhausted and its frames are sent.
    ``header_extra`` sets further header fields (``compute_ms``, ``error``, ``error_code``). A
    tensor of at most ``chunk_bytes`` is a header alone.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
    meta = meta_of(t)
    view = _byte_view(t)
    header = agent_pb2.ActivationHeader(
        stage_id=stage_id,
        plan_epoch=plan_epoch,
        request_id=request_id,
        microbatch_id=microbatch_id,
        meta=meta,
        **header_extra,  # type: ignore[arg-type]
    )
    yield HeaderFrame(header, view[:chunk_bytes])
    for offset in range(chunk_bytes, len(view), chunk_bytes):
        yield ChunkFrame(microbatch_id, offset, view[offset : offset + chunk_bytes])


def iter_frames(
    t: torch.Tensor,
    *,
    stage_id: str,
    plan_epoch: int,
    request_id: str,
    microbatch_id: int,
    chunk_bytes: int = CHUNK_BYTES,
    **header_extra: str | int | float,
) -> Iterator[agent_pb2.ActivationFrame]:
    """``iter_wire_frames`` as protobuf messages, for a stub with protobuf's own codec (tests,
    gradient sync); ``PeerLink`` and the agent's ``Forward`` send ``iter_wire_frames``."""
    for frame in iter_wire_frames(
        t,
        stage_id=stage_id,
        plan_epoch=plan_epoch,
        request_id=request_id,
        microbatch_id=microbatch_id,
        chunk_bytes=chunk_bytes,
        **header_extra,
    ):
        yield frame.to_pb()


@dataclass(slots=True)
class _Pending:
    """A microbatch whose header has arrived and whose bytes are still coming."""

    header: agent_pb2.ActivationHeader
    dtype: torch.dtype
    shape: tuple[int, ...]
    raw: torch.Tensor
    view: memoryview
    received: int = 0


class FrameAssembler:
    """Puts microbatches back together from one stream's frames, refusing anything malformed.

    Memory is bounded before it is spent: a header is checked against ``max_tensor_bytes`` before
    its buffer is allocated, at most ``max_pending`` microbatches may be incomplete at once, and
    no chunk may exceed ``max_chunk_bytes``. So one stream holds at most
    ``max_pending * max_tensor_bytes`` bytes. A refused frame drops the microbatch it belongs to,
    so a caller that chooses to keep the stream open does not keep its half-filled buffer.
    """

    def __init__(
        self, max_tensor_bytes: int, max_chunk_bytes: int = CHUNK_BYTES, max_pending: int = 64
    ) -> None:
        if max_tensor_bytes < 0 or max_chunk_bytes <= 0 or max_pending <= 0:
            raise ValueError("FrameAssembler limits must be positive")
        self.max_tensor_bytes = max_tensor_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.max_pending = max_pending
        self._pending: dict[int, _Pending] = {}

    def __len__(self) -> int:
        """Microbatches whose header has arrived but not all of their bytes."""
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes allocated for incomplete microbatches."""
        return sum(p.raw.numel() for p in self._pending.values())

    def discard(self, microbatch_id: int) -> bool:
        """Forgets an incomplete microbatch (e.g. its sender failed); True if there was one."""
        return self._pending.pop(microbatch_id, None) is not None

    def feed(self, frame: Frame) -> tuple[agent_pb2.ActivationHeader, torch.Tensor] | None:
        """Takes one frame; returns the header and tensor once a microbatch is complete."""
        if isinstance(frame, ChunkFrame):
            return self._on_chunk(frame.microbatch_id, frame.offset, frame.data)
        if isinstance(frame, HeaderFrame):
            return self._on_header(frame.header, frame.data)
        kind = frame.WhichOneof("kind")
        if kind == "header":
            return self._on_header(frame.header, frame.data)
        if frame.data:
            raise InvalidArgument("activation frame carries tensor bytes without a header")
        if kind == "chunk":
            chunk = frame.chunk
            return self._on_chunk(chunk.microbatch_id, chunk.offset, chunk.data)
        raise InvalidArgument("activation frame carries neither a header nor a chunk")

    def _on_header(
        self, header: agent_pb2.ActivationHeader, data: memoryview | bytes
    ) -> tuple[agent_pb2.ActivationHeader, torch.Tensor] | None:
        mb = header.microbatch_id
        if mb in self._pending:
            # Dropping the half-built microbatch too: its sender is confused, and keeping the
            # buffer would let a peer pin memory with headers alone.
            del self._pending[mb]
            raise InvalidArgument(
                f"duplicate header for microbatch {mb}, which is still being assembled"
            )
        if not header.HasField("meta"):
            raise InvalidArgument(f"header for microbatch {mb} has no tensor meta")
        dtype, shape = validate_meta(header.meta, max_bytes=self.max_tensor_bytes)
        if header.meta.byte_length == 0:
            if data:
                raise InvalidArgument(f"header for microbatch {mb} of no bytes carries bytes")
            return header, torch.empty(shape, dtype=dtype)
        if len(self._pending) >= self.max_pending:
            raise ResourceExhausted(
                f"more than {self.max_pending} microbatches in flight on one stream"
            )
        raw, view = _allocate(header.meta.byte_length)
        self._pending[mb] = _Pending(header=header, dtype=dtype, shape=shape, raw=raw, view=view)
        if not data:
            return None
        # The header's bytes are the tensor's first chunk, held to the same checks.
        return self._on_chunk(mb, 0, data)

    def _on_chunk(
        self, mb: int, offset: int, data: memoryview | bytes
    ) -> tuple[agent_pb2.ActivationHeader, torch.Tensor] | None:
        pending = self._pending.get(mb)
        if pending is None:
            raise InvalidArgument(f"chunk for microbatch {mb}, which has no header in flight")
        size = len(data)
        total = pending.raw.numel()
        try:
            if size > self.max_chunk_bytes:
                raise ResourceExhausted(
                    f"chunk of {size} bytes exceeds the {self.max_chunk_bytes}-byte limit"
                )
            if size == 0:
                raise InvalidArgument(f"empty chunk for microbatch {mb}")
            if offset != pending.received:
                raise InvalidArgument(
                    f"chunk for microbatch {mb} at offset {offset}, expected offset "
                    f"{pending.received}: chunks must arrive in order without gaps or overlaps"
                )
            if offset + size > total:
                raise InvalidArgument(
                    f"chunk for microbatch {mb} covers bytes [{offset}, "
                    f"{offset + size}), past the tensor's {total} bytes"
                )
        except (InvalidArgument, ResourceExhausted):
            del self._pending[mb]
            raise
        pending.view[pending.received : pending.received + size] = data
        pending.received += size
        if pending.received < total:
            return None
        del self._pending[mb]
        return pending.header, _finish(pending.raw, pending.dtype, pending.shape)
