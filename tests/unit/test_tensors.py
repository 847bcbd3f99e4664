"""The tensor codec: round trips, chunking edges, and every refusal a hostile peer can provoke."""

from __future__ import annotations

import platform
import warnings
from collections.abc import Iterable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from doramesh.channels import CHUNK_BYTES
from doramesh.errors import DoraMeshError, InvalidArgument, ResourceExhausted
from doramesh.tensors import (
    DTYPES,
    MAX_DIMS,
    ChunkFrame,
    Frame,
    FrameAssembler,
    HeaderFrame,
    decode_frame,
    dtype_name,
    encode_frame,
    iter_frames,
    iter_wire_frames,
    meta_of,
    tensor_from_pb,
    tensor_to_pb,
    tune_allocator_for_streaming,
    validate_meta,
)
from doramesh.v1 import agent_pb2, common_pb2

MIB = 1 << 20


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values that exercise the dtype (signs, fractions, both bool values)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * 50
    if dtype == torch.bool:
        return values > 0
    if dtype == torch.uint8:
        return values.abs().to(dtype)
    return values.to(dtype)


def frames_of(t: torch.Tensor, mb: int = 0, **kw: int) -> list[agent_pb2.ActivationFrame]:
    return list(
        iter_frames(t, stage_id="s0", plan_epoch=3, request_id="req", microbatch_id=mb, **kw)
    )


def assemble(
    frames: Iterable[Frame], assembler: FrameAssembler | None = None
) -> list[tuple[agent_pb2.ActivationHeader, torch.Tensor]]:
    asm = assembler or FrameAssembler(max_tensor_bytes=64 * MIB)
    done = []
    for frame in frames:
        out = asm.feed(frame)
        if out is not None:
            done.append(out)
    return done


def header(mb: int, dtype: str, shape: list[int], byte_length: int) -> agent_pb2.ActivationFrame:
    meta = common_pb2.TensorMeta(dtype=dtype, shape=shape, byte_length=byte_length)
    return agent_pb2.ActivationFrame(
        header=agent_pb2.ActivationHeader(stage_id="s0", microbatch_id=mb, meta=meta)
    )


def chunk(mb: int, offset: int, data: bytes) -> agent_pb2.ActivationFrame:
    return agent_pb2.ActivationFrame(
        chunk=agent_pb2.ActivationChunk(microbatch_id=mb, offset=offset, data=data)
    )


SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 5)]


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_whole_tensor_round_trip(name: str, shape: tuple[int, ...]) -> None:
    t = sample(DTYPES[name], shape)
    msg = tensor_to_pb(t)
    assert msg.meta.dtype == name
    assert tuple(msg.meta.shape) == shape
    assert msg.meta.byte_length == len(msg.data) == t.numel() * t.element_size()
    back = tensor_from_pb(msg, max_bytes=MIB)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_framed_round_trip(name: str, shape: tuple[int, ...]) -> None:
    t = sample(DTYPES[name], shape, seed=1)
    ((hdr, back),) = assemble(frames_of(t, mb=5, chunk_bytes=7))
    assert hdr.microbatch_id == 5 and hdr.stage_id == "s0" and hdr.plan_epoch == 3
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bfloat16_bits_survive() -> None:
    # Values that float32 rounding or a numpy detour would change.
    bits = torch.tensor([0x3F80, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8000], dtype=torch.int32).to(
        torch.int16
    )
    t = bits.view(torch.bfloat16)
    back = tensor_from_pb(tensor_to_pb(t), max_bytes=MIB)
    assert torch.equal(back.view(torch.int16), bits)


def test_wire_bytes_are_little_endian_c_order() -> None:
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32).t()  # non-contiguous
    msg = tensor_to_pb(t)
    assert list(msg.meta.shape) == [2, 2]
    assert msg.data == b"".join(v.to_bytes(4, "little") for v in (1, 3, 2, 4))


def test_received_tensor_owns_writable_memory() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    msg = tensor_to_pb(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable buffers
        back = tensor_from_pb(msg, max_bytes=MIB)
        back.add_(1)
        ((_, framed),) = assemble(frames_of(t))
        framed.add_(1)
    assert torch.equal(back, t + 1) and torch.equal(framed, t + 1)
    assert torch.equal(t, torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_received_bool_bytes_are_normalised() -> None:
    msg = common_pb2.Tensor(
        meta=common_pb2.TensorMeta(dtype="bool", shape=[3], byte_length=3), data=b"\x00\x02\xff"
    )
    back = tensor_from_pb(msg, max_bytes=MIB)
    assert back.tolist() == [False, True, True]
    assert back.view(torch.uint8).tolist() == [0, 1, 1]


def test_meta_and_dtype_names() -> None:
    meta = meta_of(torch.zeros(2, 3, dtype=torch.float16))
    assert (meta.dtype, list(meta.shape), meta.byte_length) == ("float16", [2, 3], 12)
    assert all(dtype_name(dt) == name for name, dt in DTYPES.items())
    with pytest.raises(InvalidArgument, match=r"complex64 cannot be sent; expected one of"):
        dtype_name(torch.complex64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensor_is_sent_from_host_memory() -> None:
    t = torch.randn(5, 7, device="cuda").to(torch.bfloat16)
    ((_, back),) = assemble(frames_of(t, chunk_bytes=16))
    assert back.device.type == "cpu" and torch.equal(back, t.cpu())


def test_header_extra_fields_are_set() -> None:
    frames = list(
        iter_frames(
            torch.zeros(0),
            stage_id="s",
            plan_epoch=1,
            request_id="r",
            microbatch_id=2,
            compute_ms=4.5,
            error="boom",
            error_code=13,
        )
    )
    assert len(frames) == 1
    h = frames[0].header
    assert (h.compute_ms, h.error, h.error_code, h.request_id) == (4.5, "boom", 13, "r")


# --- chunking --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nbytes", "chunk_bytes", "sizes"),
    [
        (16, 4, [4, 4, 4, 4]),  # exact multiple
        (17, 4, [4, 4, 4, 4, 1]),  # one byte over
        (3, 4, [3]),  # smaller than a chunk
        (4, 4, [4]),  # exactly one chunk
        (0, 4, []),  # header only
        (MIB, CHUNK_BYTES, [MIB]),
        (MIB + 1, CHUNK_BYTES, [MIB, 1]),
    ],
)
def test_chunk_boundaries(nbytes: int, chunk_bytes: int, sizes: list[int]) -> None:
    t = torch.arange(nbytes, dtype=torch.int64).to(torch.uint8)
    frames = frames_of(t, mb=9, chunk_bytes=chunk_bytes)
    # The header carries the first piece, the chunks the rest.
    assert frames[0].WhichOneof("kind") == "header"
    assert len(frames[0].data) == (sizes[0] if sizes else 0)
    chunks = [f.chunk for f in frames[1:]]
    assert all(f.WhichOneof("kind") == "chunk" and not f.data for f in frames[1:])
    assert [len(c.data) for c in chunks] == sizes[1:]
    assert [c.offset for c in chunks] == [i * chunk_bytes for i in range(1, len(sizes))]
    assert all(c.microbatch_id == 9 for c in chunks)
    asm = FrameAssembler(max_tensor_bytes=2 * MIB, max_chunk_bytes=chunk_bytes)
    results = [asm.feed(f) for f in frames]
    assert all(r is None for r in results[:-1])
    last = results[-1]
    assert last is not None and torch.equal(last[1], t)
    assert len(asm) == 0


def test_default_chunks_are_one_mib() -> None:
    frames = frames_of(torch.zeros(3 * MIB // 4 + 1, dtype=torch.float32))
    assert len(frames[0].data) == MIB
    assert [len(f.chunk.data) for f in frames[1:]] == [MIB, MIB, 4]


def test_interleaved_microbatches_assemble_independently() -> None:
    a, b = sample(torch.float32, (10,), 1), sample(torch.int16, (9,), 2)
    fa, fb = frames_of(a, mb=1, chunk_bytes=8), frames_of(b, mb=2, chunk_bytes=8)
    interleaved = [f for pair in zip(fa, fb, strict=False) for f in pair] + fa[len(fb) :]
    done = {h.microbatch_id: t for h, t in assemble(interleaved)}
    assert torch.equal(done[1], a) and torch.equal(done[2], b)


def test_microbatch_id_can_be_reused_after_completion() -> None:
    asm = FrameAssembler(max_tensor_bytes=MIB)
    for seed in range(3):
        t = sample(torch.float32, (5,), seed)
        ((_, back),) = assemble(frames_of(t, mb=4, chunk_bytes=8), asm)
        assert torch.equal(back, t)


def test_bad_chunk_size_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        frames_of(torch.zeros(3), chunk_bytes=0)


# --- validation ------------------------------------------------------------------------------


def meta(
    dtype: str = "float32", shape: list[int] | None = None, byte_length: int | None = None
) -> common_pb2.TensorMeta:
    shape = [2, 3] if shape is None else shape
    if byte_length is None:
        byte_length = 4 * int(torch.tensor(shape, dtype=torch.int64).prod().item())
    return common_pb2.TensorMeta(dtype=dtype, shape=shape, byte_length=byte_length)


def test_validate_meta_accepts_and_returns_dtype_and_shape() -> None:
    assert validate_meta(meta(), max_bytes=24) == (torch.float32, (2, 3))
    assert validate_meta(meta(), max_bytes=MIB, expect_shape=(None, 3), expect_dtype="float32") == (
        torch.float32,
        (2, 3),
    )


def test_unknown_dtype() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown dtype 'foo'; expected one of .*bfloat16"):
        validate_meta(meta(dtype="foo"), max_bytes=MIB)


def test_negative_dimension() -> None:
    with pytest.raises(InvalidArgument, match=r"negative dimension"):
        validate_meta(meta(shape=[2, -3], byte_length=0), max_bytes=MIB)


def test_too_many_dimensions() -> None:
    with pytest.raises(InvalidArgument, match=rf"9 dimensions; at most {MAX_DIMS}"):
        validate_meta(meta(shape=[1] * 9, byte_length=4), max_bytes=MIB)


@pytest.mark.parametrize("shape", [[1 << 40, 1 << 40], [0, 1 << 62, 1 << 62]])
def test_numel_overflow(shape: list[int]) -> None:
    with pytest.raises(InvalidArgument, match=r"overflows"):
        validate_meta(meta(shape=shape, byte_length=0), max_bytes=MIB)


def test_byte_length_mismatch_states_both_numbers() -> None:
    with pytest.raises(InvalidArgument, match=r"byte_length 25 .* expected 24 bytes"):
        validate_meta(meta(byte_length=25), max_bytes=MIB)


def test_too_large_is_resource_exhausted() -> None:
    with pytest.raises(ResourceExhausted, match=r"tensor of 24 bytes exceeds the 23-byte limit"):
        validate_meta(meta(), max_bytes=23)


def test_shape_and_dtype_expectations() -> None:
    with pytest.raises(
        InvalidArgument, match=r"shape \[2, 3\] does not match the expected \[\*, 4\]"
    ):
        validate_meta(meta(), max_bytes=MIB, expect_shape=(None, 4))
    with pytest.raises(InvalidArgument, match=r"does not match the expected \[2, 3, 1\]"):
        validate_meta(meta(), max_bytes=MIB, expect_shape=(2, 3, 1))
    with pytest.raises(InvalidArgument, match=r"dtype 'float32' does not match .*'float16'"):
        validate_meta(meta(), max_bytes=MIB, expect_dtype="float16")


def test_whole_tensor_data_length_mismatch() -> None:
    msg = common_pb2.Tensor(meta=meta(), data=b"\x00" * 23)
    with pytest.raises(InvalidArgument, match=r"23 bytes but its meta says 24"):
        tensor_from_pb(msg, max_bytes=MIB)


def test_whole_tensor_limit() -> None:
    with pytest.raises(ResourceExhausted):
        tensor_from_pb(tensor_to_pb(torch.zeros(10)), max_bytes=39)


def test_frame_without_kind() -> None:
    with pytest.raises(InvalidArgument, match="neither a header nor a chunk"):
        FrameAssembler(MIB).feed(agent_pb2.ActivationFrame())


def test_header_without_meta() -> None:
    frame = agent_pb2.ActivationFrame(header=agent_pb2.ActivationHeader(microbatch_id=1))
    with pytest.raises(InvalidArgument, match="microbatch 1 has no tensor meta"):
        FrameAssembler(MIB).feed(frame)


def test_header_meta_is_validated_against_the_tensor_limit() -> None:
    asm = FrameAssembler(max_tensor_bytes=100)
    with pytest.raises(ResourceExhausted, match="exceeds the 100-byte limit"):
        asm.feed(header(0, "float32", [26], 104))
    with pytest.raises(InvalidArgument, match="unknown dtype"):
        asm.feed(header(0, "complex64", [2], 16))
    assert len(asm) == 0


def test_chunk_for_unknown_microbatch() -> None:
    with pytest.raises(InvalidArgument, match="microbatch 3, which has no header in flight"):
        FrameAssembler(MIB).feed(chunk(3, 0, b"abcd"))


@pytest.mark.parametrize(
    ("offset", "case"), [(8, "gap"), (0, "overlap"), (2, "overlap"), (12, "out of order")]
)
def test_chunk_offset_must_follow_received_bytes(offset: int, case: str) -> None:
    asm = FrameAssembler(MIB)
    asm.feed(header(1, "uint8", [16], 16))
    asm.feed(chunk(1, 0, b"abcd"))
    with pytest.raises(InvalidArgument, match=rf"offset {offset}, expected offset 4"):
        asm.feed(chunk(1, offset, b"efgh"))
    # The microbatch is dropped: its buffer is not kept for a sender that is out of step.
    assert len(asm) == 0


def test_chunk_larger_than_limit() -> None:
    asm = FrameAssembler(max_tensor_bytes=4 * MIB)
    asm.feed(header(1, "uint8", [2 * MIB], 2 * MIB))
    with pytest.raises(ResourceExhausted, match=r"chunk of 1048577 bytes exceeds the 1048576-byte"):
        asm.feed(chunk(1, 0, b"\x00" * (MIB + 1)))


def test_chunk_running_past_the_end() -> None:
    asm = FrameAssembler(MIB)
    asm.feed(header(1, "uint8", [6], 6))
    asm.feed(chunk(1, 0, b"abcd"))
    with pytest.raises(InvalidArgument, match=r"bytes \[4, 8\), past the tensor's 6 bytes"):
        asm.feed(chunk(1, 4, b"efgh"))


def test_empty_chunk() -> None:
    asm = FrameAssembler(MIB)
    asm.feed(header(1, "uint8", [6], 6))
    with pytest.raises(InvalidArgument, match="empty chunk for microbatch 1"):
        asm.feed(chunk(1, 0, b""))


def test_duplicate_header() -> None:
    asm = FrameAssembler(MIB)
    asm.feed(header(1, "uint8", [6], 6))
    with pytest.raises(InvalidArgument, match="duplicate header for microbatch 1"):
        asm.feed(header(1, "uint8", [6], 6))
    assert len(asm) == 0


def test_too_many_microbatches_in_flight() -> None:
    asm = FrameAssembler(MIB, max_pending=3)
    for mb in range(3):
        assert asm.feed(header(mb, "uint8", [4], 4)) is None
    assert len(asm) == 3 and asm.pending_bytes == 12
    with pytest.raises(ResourceExhausted, match="more than 3 microbatches in flight"):
        asm.feed(header(3, "uint8", [4], 4))
    # Zero-byte tensors hold no buffer, so they are not counted against the bound.
    out = asm.feed(header(4, "float32", [0, 5], 0))
    assert out is not None and out[1].shape == (0, 5)
    # Completing or discarding one frees a slot.
    assert asm.discard(0) and not asm.discard(0)
    assert asm.feed(header(3, "uint8", [4], 4)) is None


def test_allocator_tuning_applies_on_glibc_only() -> None:
    # Process-wide but harmless to the test run: it only keeps freed heap for reuse.
    is_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert tune_allocator_for_streaming() is is_glibc


# --- properties ------------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    name = draw(st.sampled_from(sorted(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    return sample(DTYPES[name], shape, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=200, deadline=None)
@given(
    ts=st.lists(tensors(), min_size=1, max_size=4),
    chunk_bytes=st.integers(1, 64),
    interleave=st.booleans(),
)
def test_random_tensors_round_trip_through_frames(
    ts: list[torch.Tensor], chunk_bytes: int, interleave: bool
) -> None:
    streams = [frames_of(t, mb=i, chunk_bytes=chunk_bytes) for i, t in enumerate(ts)]
    if interleave:
        longest = max(len(s) for s in streams)
        frames = [s[i] for i in range(longest) for s in streams if i < len(s)]
    else:
        frames = [f for s in streams for f in s]
    asm = FrameAssembler(max_tensor_bytes=MIB, max_chunk_bytes=chunk_bytes)
    done = {h.microbatch_id: t for h, t in assemble(frames, asm)}
    assert len(done) == len(ts) and len(asm) == 0
    for i, t in enumerate(ts):
        assert done[i].dtype == t.dtype and done[i].shape == t.shape
        assert torch.equal(done[i], t)


_INT64 = st.integers(-(2**63), 2**63 - 1)
_UINT64 = st.integers(0, 2**64 - 1)
_GARBAGE_META = st.builds(
    common_pb2.TensorMeta,
    dtype=st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=8)),
    shape=st.lists(st.one_of(st.integers(-2, 40), _INT64), max_size=10),
    byte_length=st.one_of(st.integers(0, 4096), _UINT64),
)
_MB = st.integers(0, 3)
_GARBAGE_FRAME = st.one_of(
    st.builds(
        lambda mb, m: agent_pb2.ActivationFrame(
            header=agent_pb2.ActivationHeader(microbatch_id=mb, meta=m)
        ),
        _MB,
        _GARBAGE_META,
    ),
    st.builds(
        lambda mb: agent_pb2.ActivationFrame(header=agent_pb2.ActivationHeader(microbatch_id=mb)),
        _MB,
    ),
    st.builds(chunk, _MB, st.one_of(st.integers(0, 256), _UINT64), st.binary(max_size=96)),
    st.just(agent_pb2.ActivationFrame()),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_GARBAGE_FRAME, max_size=30))
def test_garbage_frames_only_raise_doramesh_errors(
    frames: list[agent_pb2.ActivationFrame],
) -> None:
    asm = FrameAssembler(max_tensor_bytes=4096, max_chunk_bytes=64, max_pending=3)
    for frame in frames:
        try:
            out = asm.feed(frame)
        except DoraMeshError:
            continue
        if out is not None:
            hdr, t = out
            assert t.numel() * t.element_size() == hdr.meta.byte_length
        assert len(asm) <= 3 and asm.pending_bytes <= 3 * 4096


@settings(max_examples=200, deadline=None)
@given(m=_GARBAGE_META, data=st.binary(max_size=96))
def test_garbage_whole_tensors_only_raise_doramesh_errors(
    m: common_pb2.TensorMeta, data: bytes
) -> None:
    try:
        t = tensor_from_pb(common_pb2.Tensor(meta=m, data=data), max_bytes=4096)
    except DoraMeshError:
        return
    assert t.numel() * t.element_size() == len(data)


# --- the frame codec (chunks as views) ------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(mb=_UINT64, offset=_UINT64, data=st.binary(max_size=300))
def test_encoded_chunk_is_protobufs_own_encoding(mb: int, offset: int, data: bytes) -> None:
    as_pb = chunk(mb, offset, data)
    wire = encode_frame(ChunkFrame(mb, offset, memoryview(data)))
    assert wire == as_pb.SerializeToString()
    assert agent_pb2.ActivationFrame.FromString(wire) == as_pb
    back = decode_frame(wire)
    if data:
        assert isinstance(back, ChunkFrame)
        assert (back.microbatch_id, back.offset, bytes(back.data)) == (mb, offset, data)
    else:  # an empty chunk is left to protobuf (and refused by the assembler)
        assert back == as_pb


def test_decoded_chunk_views_the_message_without_copying() -> None:
    wire = encode_frame(ChunkFrame(3, 8, memoryview(b"abcdefgh")))
    back = decode_frame(wire)
    assert isinstance(back, ChunkFrame) and isinstance(back.data, memoryview)
    assert back.data.obj is wire


def test_unusual_chunk_encodings_go_through_protobuf() -> None:
    # Fields out of order, repeated, or followed by an unknown field are valid protobuf; the
    # codec leaves them to protobuf, which reads them as any peer would.
    inner_swapped = b"\x10\x04\x08\x02\x1a\x02hi"
    inner_repeated = b"\x08\x01\x08\x02\x1a\x02hi"
    inner_unknown = b"\x08\x02\x1a\x02hi\x20\x05"
    for inner in (inner_swapped, inner_repeated, inner_unknown):
        wire = b"\x12" + bytes([len(inner)]) + inner
        back = decode_frame(wire)
        assert isinstance(back, agent_pb2.ActivationFrame)
        assert back == agent_pb2.ActivationFrame.FromString(wire)
        assert back.chunk.microbatch_id == 2 and back.chunk.data == b"hi"


@settings(max_examples=300, deadline=None)
@given(wire=st.binary(max_size=40))
def test_garbage_bytes_decode_to_a_frame_or_invalid_argument(wire: bytes) -> None:
    try:
        frame = decode_frame(wire)
    except InvalidArgument:
        return
    if isinstance(frame, ChunkFrame | HeaderFrame):
        assert agent_pb2.ActivationFrame.FromString(wire) == frame.to_pb()
    asm = FrameAssembler(max_tensor_bytes=4096, max_chunk_bytes=64, max_pending=3)
    try:
        asm.feed(frame)
    except DoraMeshError:
        pass


def test_wire_frames_round_trip_through_the_codec() -> None:
    t = sample(torch.float32, (3, 5), seed=4)
    frames = list(
        iter_wire_frames(
            t, stage_id="s", plan_epoch=1, request_id="r", microbatch_id=7, chunk_bytes=16
        )
    )
    assert isinstance(frames[0], HeaderFrame) and len(frames[0].data) == 16
    assert all(isinstance(f, ChunkFrame) for f in frames[1:])
    assert [encode_frame(f) for f in frames] == [
        f.SerializeToString()
        for f in iter_frames(
            t, stage_id="s", plan_epoch=1, request_id="r", microbatch_id=7, chunk_bytes=16
        )
    ]
    ((hdr, back),) = assemble(decode_frame(encode_frame(f)) for f in frames)
    assert hdr.microbatch_id == 7 and torch.equal(back, t)


# --- header frames carrying the tensor's first bytes -----------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    mb=_UINT64,
    stage=st.text(max_size=20),
    error=st.text(max_size=20),
    compute_ms=st.floats(allow_nan=False),
    data=st.binary(max_size=300),
)
def test_encoded_header_is_protobufs_own_encoding(
    mb: int, stage: str, error: str, compute_ms: float, data: bytes
) -> None:
    hdr = agent_pb2.ActivationHeader(
        stage_id=stage,
        microbatch_id=mb,
        error=error,
        compute_ms=compute_ms,
        meta=common_pb2.TensorMeta(dtype="uint8", shape=[len(data)], byte_length=len(data)),
    )
    as_pb = agent_pb2.ActivationFrame(header=hdr, data=data)
    wire = encode_frame(HeaderFrame(hdr, memoryview(data)))
    assert wire == as_pb.SerializeToString()
    back = decode_frame(wire)
    assert isinstance(back, HeaderFrame)
    assert back.header == hdr and bytes(back.data) == data


def test_decoded_header_views_its_bytes_without_copying() -> None:
    hdr = header(3, "uint8", [8], 8).header
    wire = encode_frame(HeaderFrame(hdr, memoryview(b"abcdefgh")))
    back = decode_frame(wire)
    assert isinstance(back, HeaderFrame) and isinstance(back.data, memoryview)
    assert back.data.obj is wire
    ((got, t),) = assemble([back])
    assert got.microbatch_id == 3 and bytes(t.numpy()) == b"abcdefgh"


def test_unusual_header_encodings_go_through_protobuf() -> None:
    hdr = header(1, "uint8", [2], 2)
    inner = hdr.header.SerializeToString()
    # Data before the header, and a frame that is both (oneof: the last one wins): valid
    # protobuf the fast path does not take, read as any peer reads it.
    data_first = b"\x1a\x02hi\x0a" + bytes([len(inner)]) + inner
    then_chunk = b"\x0a" + bytes([len(inner)]) + inner + b"\x12\x04\x08\x01\x1a\x00"
    for wire in (data_first, then_chunk):
        back = decode_frame(wire)
        assert isinstance(back, agent_pb2.ActivationFrame)
        assert back == agent_pb2.ActivationFrame.FromString(wire)
    ((_, t),) = assemble([decode_frame(data_first)])
    assert bytes(t.numpy()) == b"hi"


def test_malformed_header_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="malformed"):
        decode_frame(b"\x0a\x02\xff\xff\x1a\x01x")


def test_header_bytes_are_held_to_the_chunk_checks() -> None:
    def frame(byte_length: int, data: bytes) -> HeaderFrame:
        return HeaderFrame(header(4, "uint8", [byte_length], byte_length).header, data)

    asm = FrameAssembler(max_tensor_bytes=64, max_chunk_bytes=8)
    with pytest.raises(ResourceExhausted, match="exceeds"):
        asm.feed(frame(16, bytes(9)))
    assert len(asm) == 0  # refused, and its buffer dropped
    with pytest.raises(InvalidArgument, match="past the tensor"):
        asm.feed(frame(4, bytes(5)))
    assert len(asm) == 0
    with pytest.raises(InvalidArgument, match="no bytes"):
        asm.feed(frame(0, b"x"))
    with pytest.raises(InvalidArgument, match="without a header"):
        asm.feed(agent_pb2.ActivationFrame(chunk=chunk(4, 0, b"x").chunk, data=b"y"))
    # The header's bytes come first: the next chunk continues after them.
    assert asm.feed(frame(12, bytes(8))) is None
    with pytest.raises(InvalidArgument, match="expected offset 8"):
        asm.feed(ChunkFrame(4, 0, b"abcd"))
