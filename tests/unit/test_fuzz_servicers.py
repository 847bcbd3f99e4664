"""Fuzzing the servicer boundary: malformed requests to the coordinator's client API and to an
agent (``Forward`` frames, ``LoadStage``) are refused with INVALID_ARGUMENT or
RESOURCE_EXHAUSTED (NOT_FOUND for an unknown model), never another status or a hang, and nothing
reaches domain code; valid requests reach it unchanged.

No sockets: the servicers are called with a fake context, as gRPC would call them. Bounded and
deterministic (derandomized) for CI.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from doramesh.agent import runtime as agent_runtime
from doramesh.agent.pacing import ComputePacer
from doramesh.agent.runtime import StageRuntime, WeightCache
from doramesh.agent.servicer import AgentServicer, _spec_from_request
from doramesh.coordinator.servicer import CoordinatorServicer
from doramesh.errors import DoraMeshError, InvalidArgument, NotFound, ResourceExhausted, Status
from doramesh.models import layer_table, zoo
from doramesh.streams import StageResult
from doramesh.tensors import DTYPES, decode_frame, encode_frame, iter_wire_frames
from doramesh.v1 import agent_pb2, common_pb2, coordinator_pb2

_FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
#: A whole stream must end well within this (a hang is a failure, not a slow test).
_STREAM_BOUND_S = 5.0


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _Context:
    """What a servicer uses of ``grpc.aio.ServicerContext``: abort raises, as gRPC's does."""

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(code, details)


_CONTEXT = cast(Any, _Context())


# --- the coordinator's client API ------------------------------------------------------------


class _RecordingDeployer:
    """Stands in for the deployer: records what passed validation and echoes it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor]] = []

    async def infer(
        self, model: str, x: torch.Tensor, *, request_id: str, timeout_s: float
    ) -> tuple[StageResult, Any, float]:
        self.calls.append((model, x))
        return StageResult(x, 0.0), SimpleNamespace(plan_epoch=1), 0.0


def _meta_strategy() -> st.SearchStrategy[common_pb2.TensorMeta]:
    return st.builds(
        common_pb2.TensorMeta,
        dtype=st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=10)),
        shape=st.lists(st.one_of(st.integers(0, 16), st.integers(-(2**63), 2**63 - 1)), max_size=9),
        byte_length=st.one_of(st.integers(0, 256), st.integers(0, 2**63 - 1)),
    )


@_FUZZ
@example(model="m", has_input=True, meta=common_pb2.TensorMeta(), data=b"")
@example(
    model="m",
    has_input=True,
    meta=common_pb2.TensorMeta(dtype="float32", shape=[2**30, 2**30], byte_length=2**62),
    data=b"",
)
@given(
    model=st.text(max_size=8),
    has_input=st.booleans(),
    meta=_meta_strategy(),
    data=st.binary(max_size=128),
)
def test_infer_requests_are_validated_before_the_deployer(
    model: str, has_input: bool, meta: common_pb2.TensorMeta, data: bytes
) -> None:
    deployer = _RecordingDeployer()
    servicer = CoordinatorServicer(
        cast(Any, None), cast(Any, deployer), infer_timeout_s=1.0, max_inflight_requests=8
    )
    request = coordinator_pb2.InferRequest(model=model)
    if has_input:
        request.input.CopyFrom(common_pb2.Tensor(meta=meta, data=data))
    # Through the wire format, as the server receives it.
    request = coordinator_pb2.InferRequest.FromString(request.SerializeToString())
    try:
        response = asyncio.run(servicer.Infer(request, _CONTEXT))
    except _Aborted as err:
        assert err.code in _REFUSED, err
        assert deployer.calls == []
        return
    ((got_model, x),) = deployer.calls
    assert got_model == model and model and has_input
    assert x.numel() * x.element_size() == len(data) == meta.byte_length
    assert response.output.data == data


# --- an agent's LoadStage --------------------------------------------------------------------

_IDS = st.one_of(st.sampled_from(["s0", "e1/s0", "mlp-tiny:0"]), st.text(max_size=12))
_ADDRESSES = st.one_of(
    st.sampled_from(["127.0.0.1:7070", "[::1]:1", "h:99999"]), st.text(max_size=12)
)
_DIGESTS = st.one_of(st.just("a" * 64), st.text(alphabet="0123456789abcdefX", max_size=66))
_HOPS = st.lists(
    st.builds(
        agent_pb2.NextHop,
        address=_ADDRESSES,
        stage_id=_IDS,
        share=st.one_of(st.floats(-1, 2), st.just(float("nan"))),
        rate_mbps=st.floats(-10, 10),
        burst_kb=st.floats(-10, 10),
    ),
    max_size=3,
)


@pytest.fixture(scope="module")
def load_runtime(tmp_path_factory: pytest.TempPathFactory) -> StageRuntime:
    root: Path = tmp_path_factory.mktemp("weights")
    return StageRuntime(memory_bytes=1 << 30, cache=WeightCache(root), pacer=ComputePacer(None))


@_FUZZ
@example(stage_id="s0", model="mlp-tiny", first=0, last=2**32 - 1, epoch=2**64 - 1, hops=[])
@example(stage_id="s0", model="mlp-tiny", first=5, last=4, epoch=0, hops=[])
@given(
    stage_id=_IDS,
    model=st.one_of(st.sampled_from(["mlp-tiny", "resnet18"]), st.text(max_size=8)),
    first=st.integers(0, 2**32 - 1),
    last=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 2**64 - 1),
    hops=_HOPS,
)
def test_load_stage_requests_are_refused_before_any_fetch(
    load_runtime: StageRuntime,
    monkeypatch: pytest.MonkeyPatch,
    stage_id: str,
    model: str,
    first: int,
    last: int,
    epoch: int,
    hops: list[agent_pb2.NextHop],
) -> None:
    """Bad ids, epochs, layer ranges, hops and sizes are refused before the agent fetches a
    byte of weights; a well-formed request reaches the fetch."""

    async def fetch(spec: Any, **kwargs: Any) -> bytes:
        raise DoraMeshError("fetch reached", status=Status.ABORTED)  # a status nothing else uses

    monkeypatch.setattr(agent_runtime, "fetch_weights", fetch)
    request = agent_pb2.LoadStageRequest(
        stage_id=stage_id,
        plan_epoch=epoch,
        model=model,
        first=first,
        last=last,
        weights_digest="a" * 64,
        weights_source="127.0.0.1:7070",
        next=hops,
    )
    servicer = AgentServicer(cast(Any, None), load_runtime, max_inflight_microbatches=8)
    try:
        asyncio.run(servicer.LoadStage(request, _CONTEXT))
    except _Aborted as err:
        if err.code == grpc.StatusCode.ABORTED:  # well formed: it went on to fetch weights
            spec = _spec_from_request(request)
            assert spec.first <= spec.last < len(layer_table(model).layers)
            assert spec.plan_epoch == epoch
            return
        assert err.code in _REFUSED | {grpc.StatusCode.NOT_FOUND}, err
        if err.code == grpc.StatusCode.NOT_FOUND:
            assert model not in zoo.names()
        return
    raise AssertionError("LoadStage neither refused nor fetched")


@_FUZZ
@given(
    digest=_DIGESTS,
    source=_ADDRESSES,
    stage_id=_IDS,
)
def test_load_stage_ids_and_sources_are_checked(digest: str, source: str, stage_id: str) -> None:
    request = agent_pb2.LoadStageRequest(
        stage_id=stage_id,
        model="mlp-tiny",
        weights_digest=digest,
        weights_source=source,
    )
    try:
        spec = _spec_from_request(request)
    except (InvalidArgument, NotFound, ResourceExhausted):
        return
    assert len(spec.weights_digest) == 64 and spec.stage_id == stage_id and 0 < len(stage_id)


# --- an agent's Forward stream ---------------------------------------------------------------


def _valid_wires() -> list[bytes]:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return [
        encode_frame(f)
        for f in iter_wire_frames(
            t, stage_id="s0", plan_epoch=1, request_id="r", microbatch_id=1, chunk_bytes=16
        )
    ]


async def _run_forward(servicer: AgentServicer, wires: list[bytes]) -> list[Any]:
    async def requests() -> AsyncIterator[Any]:
        for wire in wires:
            # gRPC runs the method's deserializer (decode_frame) as the iterator advances, so
            # its errors surface here, inside the servicer.
            yield decode_frame(wire)

    out = []
    async with asyncio.timeout(_STREAM_BOUND_S):
        async for frame in servicer.Forward(requests(), _CONTEXT):
            out.append(frame)
    return out


@pytest.fixture(scope="module")
def forward_servicer(tmp_path_factory: pytest.TempPathFactory) -> AgentServicer:
    root = tmp_path_factory.mktemp("forward")
    runtime = StageRuntime(memory_bytes=1 << 20, cache=WeightCache(root), pacer=ComputePacer(None))
    return AgentServicer(cast(Any, None), runtime, max_inflight_microbatches=8)


@settings(_FUZZ, max_examples=100)
# Regression: a frame protobuf could not parse raised DecodeError in Forward's reader task, which
# died without telling the stream; the stream hung until its caller's deadline.
@example(prefix=0, garbage=[b"\x0a\x05"])
@example(prefix=1, garbage=[b"\x12\x03\x08\x01\x1a"])
@example(prefix=2, garbage=[b"\x0a\x00"])
@given(prefix=st.integers(0, 3), garbage=st.lists(st.binary(max_size=40), max_size=3))
def test_forward_refuses_malformed_streams_without_hanging(
    forward_servicer: AgentServicer, prefix: int, garbage: list[bytes]
) -> None:
    wires = _valid_wires()[:prefix] + garbage
    try:
        frames = asyncio.run(_run_forward(forward_servicer, wires))
    except _Aborted as err:
        assert err.code in _REFUSED, err
        return
    except TimeoutError:
        raise AssertionError(f"Forward hung on {wires!r}") from None
    # Accepted streams: each completed microbatch is answered, here with an error frame (this
    # agent holds no stage), never anything else.
    for frame in frames:
        assert isinstance(frame, agent_pb2.ActivationFrame) and frame.header.error
