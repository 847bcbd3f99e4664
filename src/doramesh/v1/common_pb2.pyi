from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Objective(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_UNSPECIFIED: _ClassVar[Objective]
    OBJECTIVE_MIN_LATENCY: _ClassVar[Objective]
    OBJECTIVE_MAX_THROUGHPUT: _ClassVar[Objective]
    OBJECTIVE_MIN_ENERGY: _ClassVar[Objective]
OBJECTIVE_UNSPECIFIED: Objective
OBJECTIVE_MIN_LATENCY: Objective
OBJECTIVE_MAX_THROUGHPUT: Objective
OBJECTIVE_MIN_ENERGY: Objective

class TensorMeta(_message.Message):
    __slots__ = ("dtype", "shape", "byte_length")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_length: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., byte_length: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("meta", "data")
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    meta: TensorMeta
    data: bytes
    def __init__(self, meta: _Optional[_Union[TensorMeta, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DeviceProfile(_message.Message):
    __slots__ = ("node_id", "device_class", "gflops", "memory_bytes", "cores", "power_idle_w", "power_active_w", "power_tx_w", "battery_wh", "emulated", "address", "power_source", "fleet_id", "protocol_version", "power_modes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    POWER_IDLE_W_FIELD_NUMBER: _ClassVar[int]
    POWER_ACTIVE_W_FIELD_NUMBER: _ClassVar[int]
    POWER_TX_W_FIELD_NUMBER: _ClassVar[int]
    BATTERY_WH_FIELD_NUMBER: _ClassVar[int]
    EMULATED_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    POWER_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FLEET_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    POWER_MODES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    device_class: str
    gflops: float
    memory_bytes: int
    cores: int
    power_idle_w: float
    power_active_w: float
    power_tx_w: float
    battery_wh: float
    emulated: bool
    address: str
    power_source: str
    fleet_id: str
    protocol_version: str
    power_modes: _containers.RepeatedCompositeFieldContainer[PowerMode]
    def __init__(self, node_id: _Optional[str] = ..., device_class: _Optional[str] = ..., gflops: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., cores: _Optional[int] = ..., power_idle_w: _Optional[float] = ..., power_active_w: _Optional[float] = ..., power_tx_w: _Optional[float] = ..., battery_wh: _Optional[float] = ..., emulated: _Optional[bool] = ..., address: _Optional[str] = ..., power_source: _Optional[str] = ..., fleet_id: _Optional[str] = ..., protocol_version: _Optional[str] = ..., power_modes: _Optional[_Iterable[_Union[PowerMode, _Mapping]]] = ...) -> None: ...

class PowerMode(_message.Message):
    __slots__ = ("name", "speed_factor", "power_active_w")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEED_FACTOR_FIELD_NUMBER: _ClassVar[int]
    POWER_ACTIVE_W_FIELD_NUMBER: _ClassVar[int]
    name: str
    speed_factor: float
    power_active_w: float
    def __init__(self, name: _Optional[str] = ..., speed_factor: _Optional[float] = ..., power_active_w: _Optional[float] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "gflops", "gflops_bwd", "param_bytes", "activation_bytes", "workspace_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_BWD_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    gflops: float
    gflops_bwd: float
    param_bytes: int
    activation_bytes: int
    workspace_bytes: int
    def __init__(self, name: _Optional[str] = ..., gflops: _Optional[float] = ..., gflops_bwd: _Optional[float] = ..., param_bytes: _Optional[int] = ..., activation_bytes: _Optional[int] = ..., workspace_bytes: _Optional[int] = ...) -> None: ...

class LayerTable(_message.Message):
    __slots__ = ("model", "layers", "input_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    input_bytes: int
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., input_bytes: _Optional[int] = ...) -> None: ...

class QoESpec(_message.Message):
    __slots__ = ("objective", "latency_ms", "min_throughput_sps", "energy_j_per_sample")
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_THROUGHPUT_SPS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    objective: Objective
    latency_ms: float
    min_throughput_sps: float
    energy_j_per_sample: float
    def __init__(self, objective: _Optional[_Union[Objective, str]] = ..., latency_ms: _Optional[float] = ..., min_throughput_sps: _Optional[float] = ..., energy_j_per_sample: _Optional[float] = ...) -> None: ...

class Link(_message.Message):
    __slots__ = ("a", "b", "bandwidth_mbps", "latency_ms")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_MBPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    a: str
    b: str
    bandwidth_mbps: float
    latency_ms: float
    def __init__(self, a: _Optional[str] = ..., b: _Optional[str] = ..., bandwidth_mbps: _Optional[float] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class Network(_message.Message):
    __slots__ = ("kind", "bandwidth_mbps", "latency_ms", "links")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_MBPS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    bandwidth_mbps: float
    latency_ms: float
    links: _containers.RepeatedCompositeFieldContainer[Link]
    def __init__(self, kind: _Optional[str] = ..., bandwidth_mbps: _Optional[float] = ..., latency_ms: _Optional[float] = ..., links: _Optional[_Iterable[_Union[Link, _Mapping]]] = ...) -> None: ...

class Workload(_message.Message):
    __slots__ = ("kind", "batch", "rate_rps")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    RATE_RPS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    batch: int
    rate_rps: float
    def __init__(self, kind: _Optional[str] = ..., batch: _Optional[int] = ..., rate_rps: _Optional[float] = ...) -> None: ...

class DeviceShare(_message.Message):
    __slots__ = ("id", "share", "mode")
    ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    share: float
    mode: str
    def __init__(self, id: _Optional[str] = ..., share: _Optional[float] = ..., mode: _Optional[str] = ...) -> None: ...

class StagePlan(_message.Message):
    __slots__ = ("first", "last", "devices")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceShare]
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceShare, _Mapping]]] = ...) -> None: ...

class Flow(_message.Message):
    __slots__ = ("src", "dst", "rate_mbps", "burst_kb")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    RATE_MBPS_FIELD_NUMBER: _ClassVar[int]
    BURST_KB_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    rate_mbps: float
    burst_kb: float
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., rate_mbps: _Optional[float] = ..., burst_kb: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("latency_ms", "throughput_sps", "energy_j_per_sample")
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_SPS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    latency_ms: float
    throughput_sps: float
    energy_j_per_sample: float
    def __init__(self, latency_ms: _Optional[float] = ..., throughput_sps: _Optional[float] = ..., energy_j_per_sample: _Optional[float] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("plan_id", "stages", "microbatch", "flows", "predicted")
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    plan_id: str
    stages: _containers.RepeatedCompositeFieldContainer[StagePlan]
    microbatch: int
    flows: _containers.RepeatedCompositeFieldContainer[Flow]
    predicted: Prediction
    def __init__(self, plan_id: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StagePlan, _Mapping]]] = ..., microbatch: _Optional[int] = ..., flows: _Optional[_Iterable[_Union[Flow, _Mapping]]] = ..., predicted: _Optional[_Union[Prediction, _Mapping]] = ...) -> None: ...

class PlanSet(_message.Message):
    __slots__ = ("plans", "mix")
    class MixEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PLANS_FIELD_NUMBER: _ClassVar[int]
    MIX_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[Plan]
    mix: _containers.ScalarMap[str, float]
    def __init__(self, plans: _Optional[_Iterable[_Union[Plan, _Mapping]]] = ..., mix: _Optional[_Mapping[str, float]] = ...) -> None: ...
