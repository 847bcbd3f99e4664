from doramesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetProfileRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadStageRequest(_message.Message):
    __slots__ = ("stage_id", "plan_epoch", "model", "seed", "first", "last", "weights_digest", "weights_source", "next")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    plan_epoch: int
    model: str
    seed: int
    first: int
    last: int
    weights_digest: str
    weights_source: str
    next: _containers.RepeatedCompositeFieldContainer[NextHop]
    def __init__(self, stage_id: _Optional[str] = ..., plan_epoch: _Optional[int] = ..., model: _Optional[str] = ..., seed: _Optional[int] = ..., first: _Optional[int] = ..., last: _Optional[int] = ..., weights_digest: _Optional[str] = ..., weights_source: _Optional[str] = ..., next: _Optional[_Iterable[_Union[NextHop, _Mapping]]] = ...) -> None: ...

class NextHop(_message.Message):
    __slots__ = ("address", "stage_id", "share", "rate_mbps", "burst_kb")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    RATE_MBPS_FIELD_NUMBER: _ClassVar[int]
    BURST_KB_FIELD_NUMBER: _ClassVar[int]
    address: str
    stage_id: str
    share: float
    rate_mbps: float
    burst_kb: float
    def __init__(self, address: _Optional[str] = ..., stage_id: _Optional[str] = ..., share: _Optional[float] = ..., rate_mbps: _Optional[float] = ..., burst_kb: _Optional[float] = ...) -> None: ...

class LoadStageResponse(_message.Message):
    __slots__ = ("stage_id", "param_bytes", "cache_hit", "load_seconds")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    param_bytes: int
    cache_hit: bool
    load_seconds: float
    def __init__(self, stage_id: _Optional[str] = ..., param_bytes: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class UnloadStageRequest(_message.Message):
    __slots__ = ("stage_id",)
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    def __init__(self, stage_id: _Optional[str] = ...) -> None: ...

class UnloadStageResponse(_message.Message):
    __slots__ = ("unloaded",)
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    unloaded: bool
    def __init__(self, unloaded: _Optional[bool] = ...) -> None: ...

class ActivationHeader(_message.Message):
    __slots__ = ("stage_id", "plan_epoch", "request_id", "microbatch_id", "meta", "error", "error_code", "compute_ms")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    plan_epoch: int
    request_id: str
    microbatch_id: int
    meta: _common_pb2.TensorMeta
    error: str
    error_code: int
    compute_ms: float
    def __init__(self, stage_id: _Optional[str] = ..., plan_epoch: _Optional[int] = ..., request_id: _Optional[str] = ..., microbatch_id: _Optional[int] = ..., meta: _Optional[_Union[_common_pb2.TensorMeta, _Mapping]] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class ActivationFrame(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ActivationHeader
    chunk: ActivationChunk
    def __init__(self, header: _Optional[_Union[ActivationHeader, _Mapping]] = ..., chunk: _Optional[_Union[ActivationChunk, _Mapping]] = ...) -> None: ...

class ActivationChunk(_message.Message):
    __slots__ = ("microbatch_id", "offset", "data")
    MICROBATCH_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    microbatch_id: int
    offset: int
    data: bytes
    def __init__(self, microbatch_id: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
