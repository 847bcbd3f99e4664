"""Fuzzing the activation frame codec: whatever a peer sends, the receiver answers with a typed
refusal (``InvalidArgument`` or ``ResourceExhausted``) or the exact tensor that was sent.

Bounded and deterministic for CI: every test runs at most ``_FUZZ.max_examples`` examples from a
derandomized (fixed) search, so a failure here fails the same way on every run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from doramesh import tensors
from doramesh.errors import DoraMeshError, InvalidArgument, ResourceExhausted, Status
from doramesh.tensors import (
    DTYPES,
    ChunkFrame,
    Frame,
    FrameAssembler,
    decode_frame,
    encode_frame,
    iter_wire_frames,
    tensor_from_pb,
    tensor_to_pb,
)
from doramesh.v1 import agent_pb2, common_pb2

_FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_REFUSED = {Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED}
_MAX_TENSOR = 4096
_MAX_CHUNK = 64
_MAX_PENDING = 3

_UINT64 = st.integers(0, 2**64 - 1)
_SIZES = st.one_of(
    st.integers(0, 2 * _MAX_TENSOR), st.integers(0, 2**63 - 1), st.sampled_from([2**62, 2**63 - 1])
)
_DTYPE_NAMES = st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=12))
_SHAPES = st.lists(st.one_of(st.integers(0, 8), st.integers(-(2**63), 2**63 - 1)), max_size=10)


def _refused(err: DoraMeshError) -> None:
    assert isinstance(err, InvalidArgument | ResourceExhausted), repr(err)
    assert err.status in _REFUSED


def _assembler() -> FrameAssembler:
    return FrameAssembler(_MAX_TENSOR, max_chunk_bytes=_MAX_CHUNK, max_pending=_MAX_PENDING)


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every buffer the codec allocates, by size: none may exceed what the limits allow."""
    sizes: list[int] = []
    real = tensors._allocate

    def recording(byte_length: int) -> tuple[torch.Tensor, memoryview]:
        sizes.append(byte_length)
        assert byte_length <= _MAX_TENSOR, f"allocated {byte_length} bytes past the limit"
        return real(byte_length)

    monkeypatch.setattr(tensors, "_allocate", recording)
    yield sizes


def _header(mb: int, dtype: str, shape: list[int], byte_length: int) -> agent_pb2.ActivationFrame:
    return agent_pb2.ActivationFrame(
        header=agent_pb2.ActivationHeader(
            stage_id="s",
            plan_epoch=1,
            microbatch_id=mb,
            meta=common_pb2.TensorMeta(dtype=dtype, shape=shape, byte_length=byte_length),
        )
    )


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` filled from ``raw`` (any bit pattern, NaNs too)."""
    size = int(torch.empty(shape, dtype=dtype).numel()) * torch.empty((), dtype=dtype).itemsize
    data = (raw * (size // max(len(raw), 1) + 1))[:size] if raw else bytes(size)
    if not size:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return t.ne(0).reshape(shape) if dtype == torch.bool else t.view(dtype).reshape(shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bytes(a.reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.reshape(-1).view(torch.uint8).numpy()
    )


_VALID = st.tuples(
    st.sampled_from(sorted(DTYPES)),
    st.lists(st.integers(0, 4), max_size=4),  # at most 4**4 float64s: within _MAX_TENSOR
    st.binary(max_size=64),
)


# --- valid input round-trips exactly ---------------------------------------------------------


@_FUZZ
@given(spec=_VALID, mb=_UINT64, chunk_bytes=st.integers(1, _MAX_CHUNK))
def test_valid_tensors_round_trip_through_wire_frames(
    spec: tuple[str, list[int], bytes], mb: int, chunk_bytes: int
) -> None:
    name, shape, raw = spec
    t = _tensor(DTYPES[name], tuple(shape), raw)
    asm = _assembler()
    done = None
    for frame in iter_wire_frames(
        t, stage_id="s", plan_epoch=2, request_id="r", microbatch_id=mb, chunk_bytes=chunk_bytes
    ):
        assert done is None
        done = asm.feed(decode_frame(encode_frame(frame)))
    assert done is not None
    header, back = done
    assert header.microbatch_id == mb and _same(back, t)
    assert len(asm) == 0 and asm.pending_bytes == 0


@_FUZZ
@given(spec=_VALID)
def test_valid_tensors_round_trip_as_one_message(spec: tuple[str, list[int], bytes]) -> None:
    name, shape, raw = spec
    t = _tensor(DTYPES[name], tuple(shape), raw)
    wire = tensor_to_pb(t).SerializeToString()
    assert _same(tensor_from_pb(common_pb2.Tensor.FromString(wire), max_bytes=_MAX_TENSOR), t)


# --- arbitrary and truncated bytes -----------------------------------------------------------


@_FUZZ
# Regression: a header frame cut inside its length-delimited field made protobuf raise its own
# DecodeError, which escaped Agent.Forward's error handling and left the stream hanging.
@example(wire=b"\x0a\x05")
@example(wire=b"\x12\x7f\x1a")
@example(wire=b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")
@given(wire=st.binary(max_size=200))
def test_arbitrary_bytes_decode_to_a_frame_or_invalid_argument(wire: bytes) -> None:
    try:
        frame = decode_frame(wire)
    except DoraMeshError as err:
        assert isinstance(err, InvalidArgument)
        return
    _feed_after_a_header(frame)


def _feed_after_a_header(frame: Frame) -> None:
    """Feeds ``frame`` to an assembler expecting microbatch 0..2 (so chunks have somewhere to
    go); only a typed refusal may come out."""
    asm = _assembler()
    for mb in range(_MAX_PENDING - 1):
        asm.feed(_header(mb, "uint8", [100], 100))
    try:
        asm.feed(frame)
    except DoraMeshError as err:
        _refused(err)
    assert len(asm) <= _MAX_PENDING
    assert asm.pending_bytes <= _MAX_PENDING * _MAX_TENSOR


@_FUZZ
@given(spec=_VALID, chunk_bytes=st.integers(1, 16), data=st.data())
def test_truncated_or_corrupted_frames_are_refused(
    spec: tuple[str, list[int], bytes], chunk_bytes: int, data: st.DataObject
) -> None:
    name, shape, raw = spec
    t = _tensor(DTYPES[name], tuple(shape), raw)
    wires = [
        encode_frame(f)
        for f in iter_wire_frames(
            t, stage_id="s", plan_epoch=1, request_id="r", microbatch_id=5, chunk_bytes=chunk_bytes
        )
    ]
    victim = data.draw(st.integers(0, len(wires) - 1), label="frame")
    wire = wires[victim]
    cut = data.draw(st.integers(0, len(wire)), label="cut")
    flip = data.draw(st.one_of(st.none(), st.integers(0, max(cut - 1, 0))), label="flip")
    bad = bytearray(wire[:cut])
    if flip is not None and bad:
        bad[flip] ^= data.draw(st.integers(1, 255), label="xor")
    wires[victim] = bytes(bad)
    asm = _assembler()
    try:
        for w in wires:
            done = asm.feed(decode_frame(w))
    except DoraMeshError as err:
        _refused(err)
        return
    if done is not None and bytes(bad) == wire:
        assert _same(done[1], t)
    assert asm.pending_bytes <= _MAX_TENSOR


# --- lying metadata and huge declared sizes --------------------------------------------------


@_FUZZ
@example(dtype="float32", shape=[2**40, 2**40], byte_length=0)
@example(dtype="float32", shape=[0, 2**61], byte_length=0)
@example(dtype="int64", shape=[2**31, 2**31], byte_length=2**63 - 1)
@example(dtype="uint8", shape=[2**62], byte_length=2**62)
@given(dtype=_DTYPE_NAMES, shape=_SHAPES, byte_length=_SIZES)
def test_lying_headers_are_refused_before_anything_is_allocated(
    allocations: list[int], dtype: str, shape: list[int], byte_length: int
) -> None:
    allocations.clear()
    asm = _assembler()
    try:
        header = _header(7, dtype, shape, byte_length)
    except ValueError:  # protobuf refuses the value itself (int64 range): nothing was sent
        return
    try:
        done = asm.feed(decode_frame(encode_frame(header)))
    except DoraMeshError as err:
        _refused(err)
        assert allocations == []
        return
    # Accepted: the metadata is consistent and within the limit.
    assert byte_length <= _MAX_TENSOR
    if done is not None:
        assert byte_length == 0 and allocations == []
        assert list(done[1].shape) == shape and tensors.dtype_name(done[1].dtype) == dtype
    else:
        assert allocations == [byte_length] and asm.pending_bytes == byte_length


@_FUZZ
@example(dtype="float32", shape=[2**20], byte_length=2**22, data=b"")
@given(dtype=_DTYPE_NAMES, shape=_SHAPES, byte_length=_SIZES, data=st.binary(max_size=64))
def test_lying_whole_tensors_are_refused_without_allocating(
    allocations: list[int], dtype: str, shape: list[int], byte_length: int, data: bytes
) -> None:
    allocations.clear()
    try:
        meta = common_pb2.TensorMeta(dtype=dtype, shape=shape, byte_length=byte_length)
    except ValueError:
        return
    msg = common_pb2.Tensor.FromString(common_pb2.Tensor(meta=meta, data=data).SerializeToString())
    try:
        t = tensor_from_pb(msg, max_bytes=_MAX_TENSOR)
    except DoraMeshError as err:
        _refused(err)
        assert allocations == []
        return
    assert len(data) == byte_length and allocations in ([], [byte_length])
    assert t.numel() * t.element_size() == byte_length


# --- chunk order, duplicates, overlaps, interleaving -----------------------------------------

_CHUNK_OPS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 130), st.integers(0, 80)), max_size=12
)


@_FUZZ
@example(total=8, ops=[(0, 0, 4), (0, 0, 4)])  # a duplicate
@example(total=8, ops=[(0, 4, 4), (0, 0, 4)])  # out of order
@example(total=8, ops=[(0, 0, 5), (0, 3, 5)])  # overlapping, and past the end
@example(total=8, ops=[(0, 0, 4), (1, 4, 4)])  # a chunk of another microbatch
@given(total=st.integers(1, 128), ops=_CHUNK_OPS)
def test_chunks_must_tile_the_tensor_in_order(total: int, ops: list[tuple[int, int, int]]) -> None:
    payload = bytes(range(256)) * 2
    asm = _assembler()
    asm.feed(_header(0, "uint8", [total], total))
    received = 0
    for mb, offset, size in ops:
        chunk = ChunkFrame(mb, offset, memoryview(payload[offset : offset + size]))
        actual = len(chunk.data)
        good = mb == 0 and 0 < actual <= _MAX_CHUNK and offset == received
        good = good and offset + actual <= total
        try:
            done = asm.feed(decode_frame(encode_frame(chunk)))
        except DoraMeshError as err:
            _refused(err)
            assert not good, f"refused a good chunk: {err}"
            if mb == 0:  # the refused microbatch is dropped with its buffer
                assert len(asm) == 0 and asm.pending_bytes == 0
            return
        assert good, f"accepted a bad chunk ({mb}, {offset}, {actual}) after {received} bytes"
        received += actual
        if received == total:
            assert done is not None and bytes(done[1].numpy()) == payload[:total]
            assert len(asm) == 0
            return
        assert done is None


_STREAM_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("header"), st.integers(0, 5), st.integers(0, 2 * _MAX_TENSOR)),
        st.tuples(st.just("chunk"), st.integers(0, 5), st.integers(0, 2 * _MAX_CHUNK)),
        st.tuples(st.just("discard"), st.integers(0, 5), st.just(0)),
    ),
    max_size=40,
)


@_FUZZ
@given(ops=_STREAM_OPS)
def test_interleaved_streams_stay_within_their_bounds(
    allocations: list[int], ops: list[tuple[str, int, int]]
) -> None:
    """Headers and chunks of several microbatches in any order (a peer confused or hostile):
    every frame is taken or refused with a typed error, and the assembler never holds more than
    ``max_pending`` microbatches of at most ``max_tensor_bytes`` each."""
    asm = _assembler()
    received: dict[int, int] = {}
    for kind, mb, n in ops:
        try:
            if kind == "header":
                received[mb] = 0
                asm.feed(_header(mb, "uint8", [n], n))
            elif kind == "chunk":
                # Mostly in order (so microbatches complete), off by the size now and then.
                offset = received.get(mb, 0)
                received[mb] = offset + n
                asm.feed(ChunkFrame(mb, offset, memoryview(bytes(n))))
            else:
                asm.discard(mb)
        except DoraMeshError as err:
            _refused(err)
        assert len(asm) <= _MAX_PENDING
        assert asm.pending_bytes <= _MAX_PENDING * _MAX_TENSOR
    assert all(size <= _MAX_TENSOR for size in allocations)


def test_allocation_failure_is_resource_exhausted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A declared size within the limits that the host still cannot map (strict overcommit on a
    small device) is the sender asking too much, not an untyped crash of the stream."""

    empty = torch.empty

    def no_memory(size: object, **kwargs: Any) -> torch.Tensor:
        if size == ():  # validate_meta's itemsize probe
            return empty(size, **kwargs)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(tensors.torch, "empty", no_memory)
    with pytest.raises(ResourceExhausted):
        _assembler().feed(_header(1, "uint8", [100], 100))
