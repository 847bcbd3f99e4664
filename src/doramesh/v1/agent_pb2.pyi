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
    __slots__ = ("stage_id", "plan_epoch", "model", "seed", "first", "last", "weights_digest", "weights_source", "next", "train", "power_mode")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    POWER_MODE_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    plan_epoch: int
    model: str
    seed: int
    first: int
    last: int
    weights_digest: str
    weights_source: str
    next: _containers.RepeatedCompositeFieldContainer[NextHop]
    train: TrainSpec
    power_mode: str
    def __init__(self, stage_id: _Optional[str] = ..., plan_epoch: _Optional[int] = ..., model: _Optional[str] = ..., seed: _Optional[int] = ..., first: _Optional[int] = ..., last: _Optional[int] = ..., weights_digest: _Optional[str] = ..., weights_source: _Optional[str] = ..., next: _Optional[_Iterable[_Union[NextHop, _Mapping]]] = ..., train: _Optional[_Union[TrainSpec, _Mapping]] = ..., power_mode: _Optional[str] = ...) -> None: ...

class TrainSpec(_message.Message):
    __slots__ = ("job_id", "optimizer", "resume_tag", "rank", "group")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    RESUME_TAG_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    optimizer: OptimizerSpec
    resume_tag: str
    rank: int
    group: _containers.RepeatedCompositeFieldContainer[ReplicaPeer]
    def __init__(self, job_id: _Optional[str] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., resume_tag: _Optional[str] = ..., rank: _Optional[int] = ..., group: _Optional[_Iterable[_Union[ReplicaPeer, _Mapping]]] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "lr", "momentum", "weight_decay", "beta1", "beta2", "eps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    momentum: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class ReplicaPeer(_message.Message):
    __slots__ = ("address", "stage_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    stage_id: str
    def __init__(self, address: _Optional[str] = ..., stage_id: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("stage_id", "param_bytes", "cache_hit", "load_seconds", "resumed_step")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_STEP_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    param_bytes: int
    cache_hit: bool
    load_seconds: float
    resumed_step: int
    def __init__(self, stage_id: _Optional[str] = ..., param_bytes: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., load_seconds: _Optional[float] = ..., resumed_step: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("stage_id", "plan_epoch", "request_id", "microbatch_id", "meta", "error", "error_code", "compute_ms", "train", "loss", "sync")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    plan_epoch: int
    request_id: str
    microbatch_id: int
    meta: _common_pb2.TensorMeta
    error: str
    error_code: int
    compute_ms: float
    train: TrainPart
    loss: float
    sync: GradientSync
    def __init__(self, stage_id: _Optional[str] = ..., plan_epoch: _Optional[int] = ..., request_id: _Optional[str] = ..., microbatch_id: _Optional[int] = ..., meta: _Optional[_Union[_common_pb2.TensorMeta, _Mapping]] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., compute_ms: _Optional[float] = ..., train: _Optional[_Union[TrainPart, _Mapping]] = ..., loss: _Optional[float] = ..., sync: _Optional[_Union[GradientSync, _Mapping]] = ...) -> None: ...

class TrainPart(_message.Message):
    __slots__ = ("job_id", "step", "microbatch", "offset", "loss_scale", "labels")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    microbatch: int
    offset: int
    loss_scale: float
    labels: _common_pb2.Tensor
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., microbatch: _Optional[int] = ..., offset: _Optional[int] = ..., loss_scale: _Optional[float] = ..., labels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GradientSync(_message.Message):
    __slots__ = ("step", "rank", "count")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    step: int
    rank: int
    count: int
    def __init__(self, step: _Optional[int] = ..., rank: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class TrainStepRequest(_message.Message):
    __slots__ = ("stage_id", "plan_epoch", "step")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    plan_epoch: int
    step: int
    def __init__(self, stage_id: _Optional[str] = ..., plan_epoch: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class TrainStepResponse(_message.Message):
    __slots__ = ("step", "parts", "sync_ms", "step_ms")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    SYNC_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    step: int
    parts: int
    sync_ms: float
    step_ms: float
    def __init__(self, step: _Optional[int] = ..., parts: _Optional[int] = ..., sync_ms: _Optional[float] = ..., step_ms: _Optional[float] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("stage_id", "plan_epoch", "tag", "step")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    plan_epoch: int
    tag: str
    step: int
    def __init__(self, stage_id: _Optional[str] = ..., plan_epoch: _Optional[int] = ..., tag: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("path", "bytes", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    bytes: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ActivationFrame(_message.Message):
    __slots__ = ("header", "chunk", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ActivationHeader
    chunk: ActivationChunk
    data: bytes
    def __init__(self, header: _Optional[_Union[ActivationHeader, _Mapping]] = ..., chunk: _Optional[_Union[ActivationChunk, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ActivationChunk(_message.Message):
    __slots__ = ("microbatch_id", "offset", "data")
    MICROBATCH_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    microbatch_id: int
    offset: int
    data: bytes
    def __init__(self, microbatch_id: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageStats(_message.Message):
    __slots__ = ("stage_id", "plan_epoch", "served", "compute_s")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    plan_epoch: int
    served: int
    compute_s: float
    def __init__(self, stage_id: _Optional[str] = ..., plan_epoch: _Optional[int] = ..., served: _Optional[int] = ..., compute_s: _Optional[float] = ...) -> None: ...

class AgentStats(_message.Message):
    __slots__ = ("node_id", "computations", "seconds_per_gflop", "slowdown", "cancelled_microbatches", "stages")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTATIONS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_GFLOP_FIELD_NUMBER: _ClassVar[int]
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    computations: int
    seconds_per_gflop: float
    slowdown: float
    cancelled_microbatches: int
    stages: _containers.RepeatedCompositeFieldContainer[StageStats]
    def __init__(self, node_id: _Optional[str] = ..., computations: _Optional[int] = ..., seconds_per_gflop: _Optional[float] = ..., slowdown: _Optional[float] = ..., cancelled_microbatches: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[StageStats, _Mapping]]] = ...) -> None: ...

class SetFlowRateRequest(_message.Message):
    __slots__ = ("stage_id", "next_stage_id", "rate_mbps", "burst_kb")
    STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_STAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RATE_MBPS_FIELD_NUMBER: _ClassVar[int]
    BURST_KB_FIELD_NUMBER: _ClassVar[int]
    stage_id: str
    next_stage_id: str
    rate_mbps: float
    burst_kb: float
    def __init__(self, stage_id: _Optional[str] = ..., next_stage_id: _Optional[str] = ..., rate_mbps: _Optional[float] = ..., burst_kb: _Optional[float] = ...) -> None: ...

class SetFlowRateResponse(_message.Message):
    __slots__ = ("rate_mbps", "burst_kb")
    RATE_MBPS_FIELD_NUMBER: _ClassVar[int]
    BURST_KB_FIELD_NUMBER: _ClassVar[int]
    rate_mbps: float
    burst_kb: float
    def __init__(self, rate_mbps: _Optional[float] = ..., burst_kb: _Optional[float] = ...) -> None: ...

class CancelRequestRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelRequestResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...

class SetSlowdownRequest(_message.Message):
    __slots__ = ("slowdown",)
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    slowdown: float
    def __init__(self, slowdown: _Optional[float] = ...) -> None: ...

class SetSlowdownResponse(_message.Message):
    __slots__ = ("slowdown",)
    SLOWDOWN_FIELD_NUMBER: _ClassVar[int]
    slowdown: float
    def __init__(self, slowdown: _Optional[float] = ...) -> None: ...
