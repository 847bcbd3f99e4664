"""The device profiler (speed, memory, power, profile) and the compute pacer of emulating agents."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TypedDict

import pytest
import structlog
import torch

from doramesh.agent import profiler
from doramesh.agent.catalogue import get_class
from doramesh.agent.pacing import ComputePacer
from doramesh.agent.profiler import (
    MEMORY_SAFETY_FRACTION,
    build_profile,
    measure_gflops,
    power_model,
    usable_memory_bytes,
)
from doramesh.errors import NotFound

MIB = 1 << 20


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------------- speed


def test_measure_gflops_is_quick_and_plausible() -> None:
    start = time.perf_counter()
    gflops = measure_gflops()
    elapsed = time.perf_counter() - start
    # Any CPU that runs torch does more than 0.1 GFLOP/s; nothing on one host does a PFLOP/s.
    assert 0.1 < gflops < 1e6
    assert elapsed < 1.5


def test_measure_gflops_restores_torch_threads() -> None:
    before = torch.get_num_threads()
    assert measure_gflops(0.05, threads=1) > 0
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("duration", [0.0, -1.0, float("nan")])
def test_measure_gflops_refuses_bad_durations(duration: float) -> None:
    with pytest.raises(ValueError):
        measure_gflops(duration)


# ------------------------------------------------------------------------------------ memory


class MemoryPaths(TypedDict):
    meminfo: Path
    cgroup_root: Path
    proc_cgroup: Path


def fake_memory(
    tmp_path: Path, *, available_kib: int, cgroup: dict[str, str] | None = None, own: str = "/"
) -> MemoryPaths:
    meminfo = tmp_path / "meminfo"
    write(meminfo, f"MemTotal: 99999999 kB\nMemFree: 1 kB\nMemAvailable: {available_kib} kB\n")
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in (cgroup or {}).items():
        write(root / name, text)
    proc_cgroup = tmp_path / "self-cgroup"
    write(proc_cgroup, f"0::{own}\n")
    return MemoryPaths(meminfo=meminfo, cgroup_root=root, proc_cgroup=proc_cgroup)


def test_usable_memory_is_a_fraction_of_mem_available(tmp_path: Path) -> None:
    paths = fake_memory(tmp_path, available_kib=1000 * 1024)
    assert usable_memory_bytes(**paths) == int(1000 * MIB * MEMORY_SAFETY_FRACTION)


def test_an_unlimited_cgroup_changes_nothing(tmp_path: Path) -> None:
    paths = fake_memory(tmp_path, available_kib=1000 * 1024, cgroup={"memory.max": "max\n"})
    assert usable_memory_bytes(**paths) == int(1000 * MIB * MEMORY_SAFETY_FRACTION)


def test_a_container_limit_caps_usable_memory(tmp_path: Path) -> None:
    paths = fake_memory(
        tmp_path,
        available_kib=8000 * 1024,
        cgroup={"memory.max": f"{500 * MIB}\n", "memory.current": f"{100 * MIB}\n"},
    )
    assert usable_memory_bytes(**paths) == int(400 * MIB * MEMORY_SAFETY_FRACTION)


def test_the_tightest_of_nested_cgroups_wins(tmp_path: Path) -> None:
    paths = fake_memory(
        tmp_path,
        available_kib=8000 * 1024,
        own="/system.slice/agent.service",
        cgroup={
            "system.slice/memory.max": f"{300 * MIB}",
            "system.slice/memory.current": f"{100 * MIB}",
            "system.slice/agent.service/memory.max": f"{1000 * MIB}",
            "system.slice/agent.service/memory.current": f"{50 * MIB}",
        },
    )
    assert usable_memory_bytes(**paths) == int(200 * MIB * MEMORY_SAFETY_FRACTION)


def test_cgroup_v1_limits_are_read(tmp_path: Path) -> None:
    paths = fake_memory(
        tmp_path,
        available_kib=8000 * 1024,
        cgroup={
            "memory/memory.limit_in_bytes": f"{600 * MIB}",
            "memory/memory.usage_in_bytes": f"{100 * MIB}",
        },
    )
    write(paths["proc_cgroup"], "5:memory:/\n0::/\n")
    assert usable_memory_bytes(**paths) == int(500 * MIB * MEMORY_SAFETY_FRACTION)


def test_cgroup_v1_unlimited_sentinel_is_ignored(tmp_path: Path) -> None:
    paths = fake_memory(
        tmp_path,
        available_kib=1000 * 1024,
        cgroup={"memory/memory.limit_in_bytes": str(9223372036854771712)},
    )
    write(paths["proc_cgroup"], "5:memory:/\n")
    assert usable_memory_bytes(**paths) == int(1000 * MIB * MEMORY_SAFETY_FRACTION)


def test_an_operator_limit_caps_but_never_raises(tmp_path: Path) -> None:
    paths = fake_memory(tmp_path, available_kib=1000 * 1024)
    assert usable_memory_bytes(100 * MIB, **paths) == 100 * MIB
    assert usable_memory_bytes(10_000 * MIB, **paths) == int(1000 * MIB * MEMORY_SAFETY_FRACTION)
    with pytest.raises(ValueError):
        usable_memory_bytes(0, **paths)


def test_usable_memory_on_this_host_is_positive() -> None:
    assert usable_memory_bytes() > 0


# ------------------------------------------------------------------------------------- power


def battery(root: Path, name: str = "BAT0", **files: str) -> None:
    for key, value in {"type": "Battery", **files}.items():
        write(root / "class" / "power_supply" / name / key, value + "\n")


def test_no_sensors_means_no_power_model(tmp_path: Path) -> None:
    write(tmp_path / "class" / "power_supply" / "AC" / "type", "Mains\n")
    assert power_model(tmp_path) is None


def test_a_discharging_battery_gives_draw_and_capacity(tmp_path: Path) -> None:
    battery(tmp_path, status="Discharging", power_now="7500000", energy_full="56000000")
    reading = power_model(tmp_path)
    assert reading is not None
    assert reading.power_w == pytest.approx(7.5)
    assert reading.battery_wh == pytest.approx(56.0)


def test_draw_from_voltage_and_current(tmp_path: Path) -> None:
    # Phones and some laptops have no power_now: 3.9 V x 1.2 A; capacity from charge x voltage.
    battery(
        tmp_path,
        status="Discharging",
        voltage_now="3900000",
        current_now="-1200000",
        charge_full="4500000",
        voltage_min_design="3870000",
    )
    reading = power_model(tmp_path)
    assert reading is not None
    assert reading.power_w == pytest.approx(4.68)
    assert reading.battery_wh == pytest.approx(4.5 * 3.87)


def test_a_charging_battery_gives_capacity_but_no_draw(tmp_path: Path) -> None:
    battery(tmp_path, status="Charging", power_now="30000000", energy_full="61000000")
    reading = power_model(tmp_path)
    assert reading is not None
    assert reading.power_w is None
    assert reading.battery_wh == pytest.approx(61.0)


def test_jetson_nano_input_rail(tmp_path: Path) -> None:
    write(
        tmp_path / "bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input",
        "3456\n",
    )
    reading = power_model(tmp_path)
    assert reading is not None
    assert reading.power_w == pytest.approx(3.456)
    assert reading.battery_wh is None


def test_jetson_orin_input_rail(tmp_path: Path) -> None:
    hwmon = tmp_path / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    write(hwmon / "in1_label", "VDD_IN\n")
    write(hwmon / "in1_input", "5000\n")
    write(hwmon / "curr1_input", "1200\n")
    write(hwmon / "in2_label", "VDD_CPU_GPU_CV\n")
    write(hwmon / "in2_input", "5000\n")
    write(hwmon / "curr2_input", "300\n")
    reading = power_model(tmp_path)
    assert reading is not None
    assert reading.power_w == pytest.approx(6.0)


# ----------------------------------------------------------------------------------- profile


@pytest.fixture
def host_speed(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Replace the benchmark with a fixed host speed (the list's first item) for fast tests."""
    speed = [50.0]
    monkeypatch.setattr(profiler, "measure_gflops", lambda *_a, **_k: speed[0])
    return speed


def test_emulating_reports_the_catalogue_device(host_speed: list[float], tmp_path: Path) -> None:
    host_speed[0] = 1000.0
    profile = build_profile("pi-1", "127.0.0.1:7072", emulate="raspberry-pi-4", sys_root=tmp_path)
    pi4 = get_class("raspberry-pi-4")
    assert profile.node_id == "pi-1"
    assert profile.address == "127.0.0.1:7072"
    assert profile.device_class == "raspberry-pi-4"
    assert profile.emulated is True
    assert profile.power_source == "catalogue"
    assert profile.gflops == pi4.gflops
    assert profile.cores == pi4.cores
    assert (profile.power_idle_w, profile.power_active_w, profile.power_tx_w) == (
        pi4.power_idle_w,
        pi4.power_active_w,
        pi4.power_tx_w,
    )
    assert profile.battery_wh == 0.0
    assert profile.memory_bytes <= pi4.usable_memory_bytes


def test_emulating_never_claims_more_speed_than_the_host(host_speed: list[float]) -> None:
    host_speed[0] = 5.0
    with structlog.testing.capture_logs() as logs:
        profile = build_profile("p", "h:1", emulate="raspberry-pi-5", fleet_id="f")
    assert profile.gflops == 5.0 < get_class("raspberry-pi-5").gflops
    assert profile.fleet_id == "f"
    assert any(e["log_level"] == "warning" and "capping its speed" in e["event"] for e in logs)


def test_emulating_never_claims_more_memory_than_allowed(host_speed: list[float]) -> None:
    profile = build_profile("p", "h:1", emulate="laptop-x86", memory_limit_bytes=256 * MIB)
    assert profile.memory_bytes == 256 * MIB
    assert profile.battery_wh == get_class("laptop-x86").battery_wh


def test_unknown_class_fails_before_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> float:
        raise AssertionError("measured before validating the class")

    monkeypatch.setattr(profiler, "measure_gflops", boom)
    with pytest.raises(NotFound):
        build_profile("p", "h:1", emulate="cray-1")


def test_host_without_sensors_uses_the_laptop_power_figures(
    host_speed: list[float], tmp_path: Path
) -> None:
    profile = build_profile("p", "h:1", memory_limit_bytes=64 * MIB, sys_root=tmp_path)
    laptop = get_class("laptop-x86")
    assert profile.device_class == "host"
    assert profile.emulated is False
    assert profile.gflops == 50.0
    assert profile.memory_bytes == 64 * MIB
    assert profile.power_source == "catalogue"
    assert (profile.power_idle_w, profile.power_active_w) == (
        laptop.power_idle_w,
        laptop.power_active_w,
    )
    assert profile.battery_wh == 0.0
    assert profile.cores >= 1


def test_host_with_a_discharging_battery_uses_sysfs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    battery(tmp_path, status="Discharging", power_now="6000000", energy_full="50000000")

    def busy(*_a: object, **_k: object) -> float:
        # The benchmark loads the machine: the battery reports a higher draw meanwhile.
        write(tmp_path / "class/power_supply/BAT0/power_now", "20000000\n")
        time.sleep(0.3)
        return 42.0

    monkeypatch.setattr(profiler, "measure_gflops", busy)
    profile = build_profile("p", "h:1", sys_root=tmp_path)
    assert profile.power_source == "sysfs"
    assert profile.power_idle_w == pytest.approx(6.0)
    assert profile.power_active_w == pytest.approx(20.0)
    assert profile.battery_wh == pytest.approx(50.0)
    assert profile.gflops == 42.0


def test_real_profile_end_to_end() -> None:
    start = time.perf_counter()
    profile = build_profile("p", "h:1", emulate="pixel-8", measure_s=0.1)
    assert time.perf_counter() - start < 1.5
    assert 0 < profile.gflops <= get_class("pixel-8").gflops
    assert profile.battery_wh == pytest.approx(17.7)


# ------------------------------------------------------------------------------------ pacing


def work(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


async def test_pacer_stretches_a_fast_call_to_the_target_device() -> None:
    pacer = ComputePacer(10.0)  # 1 GFLOP at 10 GFLOP/s = 0.1 s
    start = time.perf_counter()
    result, paced = await pacer.run(lambda: work(0.01), 1.0)
    elapsed = time.perf_counter() - start
    assert result == "done"
    assert 0.1 <= elapsed < 0.3
    assert 0.1 <= paced < 0.3


async def test_pacer_slowdown_multiplies_the_target() -> None:
    pacer = ComputePacer(10.0)
    pacer.slowdown = 3.0
    start = time.perf_counter()
    _, paced = await pacer.run(lambda: work(0.01), 1.0)
    assert 0.3 <= time.perf_counter() - start < 0.6
    assert paced >= 0.3


async def test_no_target_means_no_pacing() -> None:
    pacer = ComputePacer(None)
    _, paced = await pacer.run(lambda: work(0.01), 1000.0)
    assert paced < 0.1


async def test_slowdown_without_target_stretches_the_host_time() -> None:
    pacer = ComputePacer(None, slowdown=3.0)
    _, paced = await pacer.run(lambda: work(0.03), 1.0)
    assert 0.09 <= paced < 0.3


async def test_a_call_slower_than_the_target_is_not_delayed() -> None:
    pacer = ComputePacer(1000.0)  # target 1 ms
    _, paced = await pacer.run(lambda: work(0.05), 1.0)
    assert 0.05 <= paced < 0.15


async def test_pacing_leaves_the_event_loop_free() -> None:
    pacer = ComputePacer(10.0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await pacer.run(lambda: work(0.05), 2.0)  # 0.05 s of work in a thread, then 0.15 s of sleep
    task.cancel()
    assert ticks >= 5


def test_run_sync_paces_too() -> None:
    pacer = ComputePacer(10.0)
    start = time.perf_counter()
    result, paced = pacer.run_sync(lambda: 7, 1.0)
    assert result == 7
    assert 0.1 <= time.perf_counter() - start < 0.3
    assert paced >= 0.1


def test_pacer_refuses_bad_figures() -> None:
    with pytest.raises(ValueError):
        ComputePacer(0.0)
    with pytest.raises(ValueError):
        ComputePacer(10.0, slowdown=0.0)
    pacer = ComputePacer(10.0)
    with pytest.raises(ValueError):
        pacer.slowdown = -1.0
    assert pacer.slowdown == 1.0
