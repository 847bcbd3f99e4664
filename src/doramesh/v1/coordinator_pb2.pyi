from doramesh.v1 import agent_pb2 as _agent_pb2
from doramesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FleetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("profile", "state", "last_seen_s", "discovered_by")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    DISCOVERED_BY_FIELD_NUMBER: _ClassVar[int]
    profile: _common_pb2.DeviceProfile
    state: str
    last_seen_s: float
    discovered_by: str
    def __init__(self, profile: _Optional[_Union[_common_pb2.DeviceProfile, _Mapping]] = ..., state: _Optional[str] = ..., last_seen_s: _Optional[float] = ..., discovered_by: _Optional[str] = ...) -> None: ...

class FleetView(_message.Message):
    __slots__ = ("agents", "deployments")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ..., deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("model", "seed", "qoe", "workload", "planner", "sample_shape", "plan", "max_plans", "plans")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    QOE_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    MAX_PLANS_FIELD_NUMBER: _ClassVar[int]
    PLANS_FIELD_NUMBER: _ClassVar[int]
    model: str
    seed: int
    qoe: _common_pb2.QoESpec
    workload: _common_pb2.Workload
    planner: str
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    plan: _common_pb2.Plan
    max_plans: int
    plans: _containers.RepeatedCompositeFieldContainer[_common_pb2.Plan]
    def __init__(self, model: _Optional[str] = ..., seed: _Optional[int] = ..., qoe: _Optional[_Union[_common_pb2.QoESpec, _Mapping]] = ..., workload: _Optional[_Union[_common_pb2.Workload, _Mapping]] = ..., planner: _Optional[str] = ..., sample_shape: _Optional[_Iterable[int]] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., max_plans: _Optional[int] = ..., plans: _Optional[_Iterable[_Union[_common_pb2.Plan, _Mapping]]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("model", "plan_epoch", "plan", "status", "error", "share")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    model: str
    plan_epoch: int
    plan: _common_pb2.Plan
    status: str
    error: str
    share: float
    def __init__(self, model: _Optional[str] = ..., plan_epoch: _Optional[int] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., status: _Optional[str] = ..., error: _Optional[str] = ..., share: _Optional[float] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("deployment", "live")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    live: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., live: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "input", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    input: _common_pb2.Tensor
    request_id: str
    def __init__(self, model: _Optional[str] = ..., input: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "output", "plan_epoch", "latency_ms", "compute_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    output: _common_pb2.Tensor
    plan_epoch: int
    latency_ms: float
    compute_ms: float
    def __init__(self, request_id: _Optional[str] = ..., output: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., plan_epoch: _Optional[int] = ..., latency_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class JobStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class JobStatusResponse(_message.Message):
    __slots__ = ("deployment", "requests_served", "requests_failed", "latency_ms_p50", "latency_ms_p95", "live", "reweights", "requests_replayed", "replan_live_s")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P50_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P95_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    REWEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    REPLAN_LIVE_S_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    requests_served: int
    requests_failed: int
    latency_ms_p50: float
    latency_ms_p95: float
    live: _containers.RepeatedCompositeFieldContainer[Deployment]
    reweights: int
    requests_replayed: int
    replan_live_s: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., requests_served: _Optional[int] = ..., requests_failed: _Optional[int] = ..., latency_ms_p50: _Optional[float] = ..., latency_ms_p95: _Optional[float] = ..., live: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., reweights: _Optional[int] = ..., requests_replayed: _Optional[int] = ..., replan_live_s: _Optional[_Iterable[float]] = ...) -> None: ...

class FetchStageRequest(_message.Message):
    __slots__ = ("model", "seed", "first", "last", "digest")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    model: str
    seed: int
    first: int
    last: int
    digest: str
    def __init__(self, model: _Optional[str] = ..., seed: _Optional[int] = ..., first: _Optional[int] = ..., last: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("digest", "total_bytes", "offset", "data")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    digest: str
    total_bytes: int
    offset: int
    data: bytes
    def __init__(self, digest: _Optional[str] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("model", "seed", "plan", "planner", "qoe", "steps", "batch", "microbatches", "optimizer", "data_seed", "sample_shape", "checkpoint_every", "resume_from", "job_id", "dataset_batches")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    QOE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MICROBATCHES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    DATA_SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_BATCHES_FIELD_NUMBER: _ClassVar[int]
    model: str
    seed: int
    plan: _common_pb2.Plan
    planner: str
    qoe: _common_pb2.QoESpec
    steps: int
    batch: int
    microbatches: int
    optimizer: _agent_pb2.OptimizerSpec
    data_seed: int
    sample_shape: _containers.RepeatedScalarFieldContainer[int]
    checkpoint_every: int
    resume_from: str
    job_id: str
    dataset_batches: int
    def __init__(self, model: _Optional[str] = ..., seed: _Optional[int] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., planner: _Optional[str] = ..., qoe: _Optional[_Union[_common_pb2.QoESpec, _Mapping]] = ..., steps: _Optional[int] = ..., batch: _Optional[int] = ..., microbatches: _Optional[int] = ..., optimizer: _Optional[_Union[_agent_pb2.OptimizerSpec, _Mapping]] = ..., data_seed: _Optional[int] = ..., sample_shape: _Optional[_Iterable[int]] = ..., checkpoint_every: _Optional[int] = ..., resume_from: _Optional[str] = ..., job_id: _Optional[str] = ..., dataset_batches: _Optional[int] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("job_id", "step", "last_step", "loss", "step_ms", "plan_epoch", "plan", "checkpoint", "samples_per_s", "resumed_from")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    PLAN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    last_step: int
    loss: float
    step_ms: float
    plan_epoch: int
    plan: _common_pb2.Plan
    checkpoint: str
    samples_per_s: float
    resumed_from: int
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., last_step: _Optional[int] = ..., loss: _Optional[float] = ..., step_ms: _Optional[float] = ..., plan_epoch: _Optional[int] = ..., plan: _Optional[_Union[_common_pb2.Plan, _Mapping]] = ..., checkpoint: _Optional[str] = ..., samples_per_s: _Optional[float] = ..., resumed_from: _Optional[int] = ...) -> None: ...

class SetPacingRequest(_message.Message):
    __slots__ = ("enabled",)
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    def __init__(self, enabled: _Optional[bool] = ...) -> None: ...

class SetPacingResponse(_message.Message):
    __slots__ = ("enabled", "flows_changed")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    FLOWS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    flows_changed: int
    def __init__(self, enabled: _Optional[bool] = ..., flows_changed: _Optional[int] = ...) -> None: ...
