from doramesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlanRequest(_message.Message):
    __slots__ = ("devices", "network", "model", "workload", "qoe", "max_plans", "planner", "time_limit_s")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    QOE_FIELD_NUMBER: _ClassVar[int]
    MAX_PLANS_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_S_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[_common_pb2.DeviceProfile]
    network: _common_pb2.Network
    model: _common_pb2.LayerTable
    workload: _common_pb2.Workload
    qoe: _common_pb2.QoESpec
    max_plans: int
    planner: str
    time_limit_s: float
    def __init__(self, devices: _Optional[_Iterable[_Union[_common_pb2.DeviceProfile, _Mapping]]] = ..., network: _Optional[_Union[_common_pb2.Network, _Mapping]] = ..., model: _Optional[_Union[_common_pb2.LayerTable, _Mapping]] = ..., workload: _Optional[_Union[_common_pb2.Workload, _Mapping]] = ..., qoe: _Optional[_Union[_common_pb2.QoESpec, _Mapping]] = ..., max_plans: _Optional[int] = ..., planner: _Optional[str] = ..., time_limit_s: _Optional[float] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("plan_set", "plan_seconds", "planner")
    PLAN_SET_FIELD_NUMBER: _ClassVar[int]
    PLAN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PLANNER_FIELD_NUMBER: _ClassVar[int]
    plan_set: _common_pb2.PlanSet
    plan_seconds: float
    planner: str
    def __init__(self, plan_set: _Optional[_Union[_common_pb2.PlanSet, _Mapping]] = ..., plan_seconds: _Optional[float] = ..., planner: _Optional[str] = ...) -> None: ...
