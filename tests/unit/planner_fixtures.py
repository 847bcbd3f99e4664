"""Small hand-made devices and layer tables shared by the planner's unit tests."""

from __future__ import annotations

from doramesh.types import DeviceProfile, LayerInfo, LayerTable, NodeId

MB = 1_000_000
#: Wall time a timed planner call may take past its limit in a test: the box is shared and
#: loaded, so the test process itself may wait for a core (the planning-time bench counts
#: every run past the bare limit).
TIME_SLACK_S = 0.25


def device(
    name: str,
    gflops: float,
    memory_mb: float = 10_000,
    *,
    idle: float = 2.0,
    active: float = 6.0,
    tx: float = 1.0,
    battery_wh: float = 0.0,
) -> DeviceProfile:
    return DeviceProfile(
        node_id=NodeId(name),
        device_class="test",
        gflops=gflops,
        memory_bytes=int(memory_mb * MB),
        power_idle_w=idle,
        power_active_w=active,
        power_tx_w=tx,
        battery_wh=battery_wh,
    )


def uniform_table(
    n: int, *, gflops: float = 1.0, param_mb: float = 10, act_mb: float = 0.1
) -> LayerTable:
    layers = tuple(
        LayerInfo(
            f"l{i}",
            gflops=gflops,
            param_bytes=int(param_mb * MB),
            activation_bytes=int(act_mb * MB),
        )
        for i in range(n)
    )
    return LayerTable("uniform", layers, input_bytes=1000)
