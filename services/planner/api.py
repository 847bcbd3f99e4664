"""The planner's pure entry point: validate the inputs, pick the planner, return a plan set.

No gRPC, no I/O: the servicer, the CLI (``doramesh plan``) and the bench call this same
function, so a scenario planned offline and one planned over the wire give the same plans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from doramesh.errors import FailedPrecondition, InvalidArgument
from doramesh.types import DeviceProfile, LayerTable, Network, PlanSet, QoESpec, Workload

from . import dp

#: The planners this build knows (baselines come later).
PLANNERS: tuple[str, ...] = ("doramesh",)
DEFAULT_PLANNER = "doramesh"
DEFAULT_MAX_PLANS = 4
#: Upper bound on ``max_plans``: a plan set is meant to be compact.
MAX_PLANS_LIMIT = 16

_OBJECTIVES = ("min_latency", "max_throughput", "min_energy")


def plan(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    max_plans: int = DEFAULT_MAX_PLANS,
    planner: str = DEFAULT_PLANNER,
    time_limit_s: float | None = None,
) -> PlanSet:
    """A compact set of QoE-compliant plans, best first (see ``dp.plan_set``).

    Raises ``InvalidArgument`` for malformed input (naming the field) or an unknown planner, and
    ``FailedPrecondition`` when the fleet cannot run the model within memory or the QoE (the
    message names the binding constraint and by how much).
    """
    if planner not in PLANNERS:
        raise InvalidArgument(f"unknown planner {planner!r}; known planners: {', '.join(PLANNERS)}")
    if not 1 <= max_plans <= MAX_PLANS_LIMIT:
        raise InvalidArgument(f"max_plans must be in 1..{MAX_PLANS_LIMIT}, got {max_plans}")
    if time_limit_s is not None and not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise InvalidArgument(f"time_limit_s must be a positive number, got {time_limit_s}")
    validate(devices, table, network, workload, qoe)
    return dp.plan_set(
        devices, table, network, workload, qoe, max_plans=max_plans, time_limit_s=time_limit_s
    )


def validate(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
) -> None:
    """Reject inputs the cost model cannot price, naming the field (and device or layer)."""
    if not table.layers:
        raise InvalidArgument(f"model {table.model!r}: the layer table is empty")
    _non_negative_int(table.input_bytes, "model.input_bytes")
    for index, layer in enumerate(table.layers):
        where = f"model.layers[{index}] ({layer.name})"
        _non_negative(layer.gflops, f"{where}.gflops")
        _non_negative(layer.gflops_bwd, f"{where}.gflops_bwd")
        _non_negative_int(layer.param_bytes, f"{where}.param_bytes")
        _non_negative_int(layer.activation_bytes, f"{where}.activation_bytes")
        _non_negative_int(layer.workspace_bytes, f"{where}.workspace_bytes")

    if workload.kind not in ("inference", "training"):
        raise InvalidArgument(
            f"workload.kind must be 'inference' or 'training', got {workload.kind!r}"
        )
    if not isinstance(workload.batch, int) or workload.batch < 1:
        raise InvalidArgument(f"workload.batch must be a positive integer, got {workload.batch}")
    _non_negative(workload.rate_rps, "workload.rate_rps")

    if qoe.objective not in _OBJECTIVES:
        raise InvalidArgument(
            f"qoe.objective must be one of {', '.join(_OBJECTIVES)}, got {qoe.objective!r}"
        )
    for name in ("latency_ms", "min_throughput_sps", "energy_j_per_sample"):
        value = getattr(qoe, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InvalidArgument(f"qoe.{name} must be positive when set, got {value}")

    if not devices:
        raise FailedPrecondition("no devices to plan on: the fleet is empty")
    seen: set[str] = set()
    for device in devices:
        name = device.node_id
        if not name:
            raise InvalidArgument("device.node_id must not be empty")
        if name in seen:
            raise InvalidArgument(f"device {name}: node_id appears twice")
        seen.add(name)
        _positive(device.gflops, f"device {name}: gflops")
        if not isinstance(device.memory_bytes, int) or device.memory_bytes <= 0:
            raise InvalidArgument(
                f"device {name}: memory_bytes must be positive, got {device.memory_bytes}"
            )
        _non_negative(device.power_idle_w, f"device {name}: power_idle_w")
        _non_negative(device.power_active_w, f"device {name}: power_active_w")
        _non_negative(device.power_tx_w, f"device {name}: power_tx_w")

    if network.kind == "shared":
        _positive(network.bandwidth_mbps, "network.bandwidth_mbps")
        _non_negative(network.latency_ms, "network.latency_ms")
    elif network.kind == "links":
        for index, link in enumerate(network.links):
            where = f"network.links[{index}] ({link.a}-{link.b})"
            for end in (link.a, link.b):
                if end not in seen:
                    raise InvalidArgument(f"{where}: unknown device {end!r}")
            if link.a == link.b:
                raise InvalidArgument(f"{where}: a link joins two different devices")
            _positive(link.bandwidth_mbps, f"{where}.bandwidth_mbps")
            _non_negative(link.latency_ms, f"{where}.latency_ms")
    else:
        raise InvalidArgument(f"network.kind must be 'shared' or 'links', got {network.kind!r}")


def _positive(value: float, field: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{field} must be positive, got {value}")


def _non_negative(value: float, field: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument(f"{field} must be zero or positive, got {value}")


def _non_negative_int(value: int, field: str) -> None:
    if not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{field} must be a non-negative integer, got {value}")
