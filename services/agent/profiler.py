"""Measures this device for its DeviceProfile: effective speed, usable memory and a power model.

An agent runs ``build_profile`` once at start, so everything here is quick (about a second) and
reads only local files. torch is imported inside ``measure_gflops`` alone: reading memory or power
figures must not pay for importing it.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from doramesh.agent.catalogue import DeviceClass, get_class
from doramesh.types import DeviceProfile, NodeId, PowerMode

_log = structlog.get_logger("agent.profiler")

#: Share of the memory the OS reports free that doramesh takes: the rest absorbs allocator slack,
#: page cache other processes need, and torch's own transient buffers.
MEMORY_SAFETY_FRACTION = 0.8
#: The catalogue entry whose power figures stand in for a host without power sensors.
FALLBACK_POWER_CLASS = "laptop-x86"
#: cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything above this is
#: treated as unlimited.
_CGROUP_V1_UNLIMITED = 1 << 60


# --------------------------------------------------------------------------------------- speed


@dataclass(frozen=True, slots=True)
class _Op:
    """One micro-benchmark: a shape models run, its FLOPs, and its weight in the statistic."""

    name: str
    flops: float
    weight: int
    make: Callable[[], Callable[[], object]]


def _ops(device: str) -> tuple[_Op, ...]:
    import torch
    import torch.nn.functional as F

    target = torch.device(device)

    def randn(*shape: int) -> torch.Tensor:
        # Seeded on the CPU, then moved: the same operands on every device and every run.
        gen = torch.Generator().manual_seed(0)
        return torch.randn(*shape, generator=gen).to(target)

    def matmul(m: int, k: int, n: int) -> Callable[[], Callable[[], object]]:
        def make() -> Callable[[], object]:
            a, b = randn(m, k), randn(k, n)
            return lambda: torch.mm(a, b)

        return make

    def conv() -> Callable[[], object]:
        x, w = randn(1, 64, 56, 56), randn(64, 64, 3, 3)
        return lambda: F.conv2d(x, w, padding=1)

    # Sizes of the layers the zoo models run at small batch: GPT-2-small projections (768 wide,
    # 3072 MLP) over short token batches, a mid square, and a ResNet stage-1 3x3 conv. None is
    # larger than ~0.6 GFLOP so a Pi 4 still gets a few timed runs of each within the budget.
    # The smaller shapes weigh more because that is where models spend their time at the edge
    # and where a device falls furthest below its big-matmul peak.
    return (
        _Op("mm32x768x768", 2 * 32 * 768 * 768, 3, matmul(32, 768, 768)),
        _Op("mm128x768x768", 2 * 128 * 768 * 768, 2, matmul(128, 768, 768)),
        _Op("mm128x768x3072", 2 * 128 * 768 * 3072, 1, matmul(128, 768, 3072)),
        _Op("mm512x512x512", 2 * 512**3, 1, matmul(512, 512, 512)),
        _Op("conv64x56x56k3", 2 * 64 * 64 * 9 * 56 * 56, 2, conv),
    )


def _weighted_median(values: list[tuple[float, int]]) -> float:
    ordered = sorted(values)
    total = sum(w for _, w in ordered)
    seen = 0
    for value, weight in ordered:
        seen += weight
        if 2 * seen >= total:
            return value
    raise ValueError("no values")


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_gflops(
    duration_s: float = 0.5, threads: int | None = None, *, device: str = "cpu"
) -> float:
    """Effective fp32 GFLOP/s of this host on model-sized matmuls and a conv, via torch.

    ``device`` is the torch device stages will run on ("cuda" on a Jetson), so the figure is the
    one stage times will show; ``threads`` likewise should be the agent's intra-op thread count.

    Each op gets an equal share of ``duration_s``: one untimed warm-up run (first-call dispatch,
    allocation), then timed runs until its share is spent (at least one). An op's rate is its FLOPs
    over the *median* run time, so a stray context switch does not count; the result is the
    weighted median of the ops' rates. Total time is ``duration_s`` plus one warm-up per op.
    """
    import torch

    if not math.isfinite(duration_s) or duration_s <= 0:
        raise ValueError(f"duration_s must be positive, not {duration_s!r}")
    ops = _ops(device)
    # GPU kernels are queued, not run: time them to completion.
    sync: Callable[[], None] = (
        torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    )
    share = duration_s / len(ops)
    rates: list[tuple[float, int]] = []
    with torch.inference_mode(), _torch_threads(threads):
        for op in ops:
            run = op.make()
            run()
            sync()
            times: list[float] = []
            deadline = time.perf_counter() + share
            while True:
                t0 = time.perf_counter()
                run()
                sync()
                t1 = time.perf_counter()
                times.append(t1 - t0)
                if t1 >= deadline:
                    break
            seconds = max(statistics.median(times), 1e-9)
            rates.append((op.flops / seconds / 1e9, op.weight))
    gflops = _weighted_median(rates)
    _log.debug(
        "measured compute",
        gflops=round(gflops, 1),
        per_op={op.name: round(r, 1) for op, (r, _) in zip(ops, rates, strict=True)},
        threads=threads or torch.get_num_threads(),
        device=device,
    )
    return gflops


# -------------------------------------------------------------------------------------- memory


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _mem_available_bytes(meminfo: Path) -> int | None:
    text = _read_text(meminfo)
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            try:
                return int(parts[1]) * 1024  # reported in kB (KiB)
            except (ValueError, IndexError):
                return None
    return None


def _physical_memory_bytes() -> int | None:
    """Total RAM from sysconf, for systems without /proc/meminfo."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _own_cgroup_dirs(cgroup_root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's cgroup directory and its ancestors up to the root, innermost first.

    In a container with a cgroup namespace the process sits at "/" and this is just the root;
    on a host under systemd it is e.g. /sys/fs/cgroup/system.slice/doramesh-agent.service.
    """
    dirs: list[Path] = []
    text = _read_text(proc_cgroup) or ""
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        is_v2 = hierarchy == "0" and controllers == ""
        is_v1_memory = "memory" in controllers.split(",")
        if not (is_v2 or is_v1_memory):
            continue
        base = cgroup_root if is_v2 else cgroup_root / "memory"
        current = base / path.lstrip("/")
        while True:
            dirs.append(current)
            if current == base or base not in current.parents:
                break
            current = current.parent
    if not dirs:
        dirs = [cgroup_root, cgroup_root / "memory"]
    return dirs


def _cgroup_headroom_bytes(cgroup_root: Path, proc_cgroup: Path) -> int | None:
    """The smallest (limit - usage) over this process's cgroups, or None where nothing is limited.

    cgroup v2: memory.max ("max" = unlimited) and memory.current; v1: memory.limit_in_bytes and
    memory.usage_in_bytes.
    """
    headroom: int | None = None
    for directory in _own_cgroup_dirs(cgroup_root, proc_cgroup):
        for limit_name, usage_name in (
            ("memory.max", "memory.current"),
            ("memory.limit_in_bytes", "memory.usage_in_bytes"),
        ):
            limit_text = _read_text(directory / limit_name)
            if limit_text is None or limit_text == "max":
                continue
            try:
                limit = int(limit_text)
            except ValueError:
                continue
            if limit >= _CGROUP_V1_UNLIMITED:
                continue
            usage = _read_int(directory / usage_name) or 0
            room = max(0, limit - usage)
            headroom = room if headroom is None else min(headroom, room)
    return headroom


def usable_memory_bytes(
    limit_bytes: int | None = None,
    *,
    meminfo: Path = Path("/proc/meminfo"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> int:
    """Bytes doramesh may use on this host: a safety fraction of what is free, capped by limits.

    Free is the smaller of /proc/meminfo MemAvailable (what can be allocated without swapping) and
    the headroom of this process's cgroups (a container's memory.max). ``limit_bytes`` (the
    operator's --memory-limit-mb) caps the result further but never raises it.
    """
    candidates = [
        v
        for v in (
            _mem_available_bytes(meminfo),
            _cgroup_headroom_bytes(cgroup_root, proc_cgroup),
        )
        if v is not None
    ]
    if not candidates:
        physical = _physical_memory_bytes()
        if physical is not None:
            # No way to tell what is free: assume half the RAM is taken by everything else.
            candidates.append(physical // 2)
    if not candidates:
        raise RuntimeError("cannot read this host's memory (no /proc/meminfo, no sysconf)")
    usable = int(min(candidates) * MEMORY_SAFETY_FRACTION)
    if limit_bytes is not None:
        if limit_bytes <= 0:
            raise ValueError(f"memory limit must be positive, not {limit_bytes}")
        usable = min(usable, limit_bytes)
    return usable


# --------------------------------------------------------------------------------------- power


@dataclass(frozen=True, slots=True)
class PowerReading:
    """What this host's sensors report. Either figure may be missing."""

    #: Whole-device draw now, in watts (a discharging battery, or a board's input power monitor).
    power_w: float | None
    #: Full-charge battery energy, in watt-hours (sum over batteries).
    battery_wh: float | None
    #: The sysfs files the draw came from, for the log.
    sources: tuple[str, ...] = ()


def _battery_power_w(supply: Path) -> float | None:
    """Draw from a discharging battery: power_now (µW), else voltage_now (µV) x current_now (µA).

    A charging battery's figures are the charge rate, not what the device draws, so only a
    discharging battery counts.
    """
    if (_read_text(supply / "status") or "").lower() != "discharging":
        return None
    power_uw = _read_int(supply / "power_now")
    if power_uw is not None and power_uw != 0:
        return abs(power_uw) / 1e6
    voltage_uv = _read_int(supply / "voltage_now")
    current_ua = _read_int(supply / "current_now")
    if voltage_uv and current_ua:
        return abs(voltage_uv * current_ua) / 1e12
    return None


def _battery_wh(supply: Path) -> float | None:
    energy_uwh = _read_int(supply / "energy_full")
    if energy_uwh:
        return energy_uwh / 1e6
    charge_uah = _read_int(supply / "charge_full")
    voltage_uv = _read_int(supply / "voltage_min_design") or _read_int(supply / "voltage_now")
    if charge_uah and voltage_uv:
        return charge_uah * voltage_uv / 1e12
    return None


def _jetson_input_power_w(sys_root: Path) -> tuple[float, str] | None:
    """The module's input power from the on-board INA3221 monitor.

    Jetson Nano / TX (L4T 32, driver ina3221x): iio in_power0_input in mW, channel 0 = POM_5V_IN.
    Orin (L4T 35+, driver ina3221 under hwmon): the channel labelled VDD_IN, voltage in mV
    (in<N>_input) x current in mA (curr<N>_input).
    """
    drivers = sys_root / "bus" / "i2c" / "drivers"
    for path in sorted((drivers / "ina3221x").glob("*/iio:device*/in_power0_input")):
        mw = _read_int(path)
        if mw is not None and mw > 0:
            return mw / 1e3, str(path)
    for label in sorted((drivers / "ina3221").glob("*/hwmon/hwmon*/in*_label")):
        if (_read_text(label) or "").upper() not in ("VDD_IN", "POM_5V_IN"):
            continue
        channel = label.name.removeprefix("in").removesuffix("_label")
        mv = _read_int(label.parent / f"in{channel}_input")
        ma = _read_int(label.parent / f"curr{channel}_input")
        if mv and ma:
            return mv * ma / 1e6, str(label.parent)
    return None


def power_model(sys_root: Path = Path("/sys")) -> PowerReading | None:
    """Read this host's power sensors from sysfs; None where there are none.

    Sources: /sys/class/power_supply/* (laptops, phones; type Battery) and the Jetson INA3221
    input-power monitor. A caller without a reading falls back to the catalogue.
    """
    power_w: float | None = None
    battery: float | None = None
    sources: list[str] = []
    for supply in sorted((sys_root / "class" / "power_supply").glob("*")):
        if (_read_text(supply / "type") or "") != "Battery":
            continue
        draw = _battery_power_w(supply)
        if draw is not None:
            power_w = (power_w or 0.0) + draw
            sources.append(str(supply))
        capacity = _battery_wh(supply)
        if capacity is not None:
            battery = (battery or 0.0) + capacity
    if power_w is None:
        jetson = _jetson_input_power_w(sys_root)
        if jetson is not None:
            power_w, source = jetson
            sources.append(source)
    if power_w is None and battery is None:
        return None
    return PowerReading(power_w=power_w, battery_wh=battery, sources=tuple(sources))


class _PowerSampler:
    """Samples the host's draw in a background thread while the speed benchmark loads the CPU."""

    def __init__(self, sys_root: Path, interval_s: float = 0.05) -> None:
        self._sys_root = sys_root
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples: list[float] = []
        self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            reading = power_model(self._sys_root)
            if reading is not None and reading.power_w is not None:
                self.samples.append(reading.power_w)

    def __enter__(self) -> _PowerSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


# ------------------------------------------------------------------------------------- profile


def build_profile(
    node_id: str,
    address: str,
    *,
    emulate: str | None = None,
    memory_limit_bytes: int | None = None,
    fleet_id: str = "",
    measure_s: float = 0.5,
    threads: int | None = None,
    device: str = "cpu",
    sys_root: Path = Path("/sys"),
    power_modes: Sequence[PowerMode] = (),
) -> DeviceProfile:
    """This agent's DeviceProfile: measured, or a catalogue device's when emulating.

    ``power_modes`` are the modes this agent can apply (``doramesh.agent.power``), top mode
    first; the profile advertises those and no others. The top mode takes the profile's own
    active power (measured, or the catalogue's), the others keep their stated figures.

    Emulating (``emulate=CLASS``): the catalogue's gflops, memory and power, but never more speed
    or memory than this host really has (an emulator can slow down, not speed up). Otherwise: the
    measured gflops and memory, with power from sysfs where it can be read (idle draw before the
    benchmark, active draw sampled during it) and the ``laptop-x86`` entry's figures elsewhere.
    Raises ``NotFound`` for an unknown class before spending time measuring.
    """
    if emulate is not None:
        emulated = get_class(emulate)
        host_gflops = measure_gflops(measure_s, threads, device=device)
        host_memory = usable_memory_bytes(memory_limit_bytes)
        profile = _emulated_profile(
            node_id,
            address,
            emulated,
            host_gflops=host_gflops,
            host_memory=host_memory,
            fleet_id=fleet_id,
        )
    else:
        idle = power_model(sys_root)
        sampler = _PowerSampler(sys_root) if idle is not None and idle.power_w is not None else None
        with sampler if sampler is not None else nullcontext():
            host_gflops = measure_gflops(measure_s, threads, device=device)
        host_memory = usable_memory_bytes(memory_limit_bytes)
        fallback = get_class(FALLBACK_POWER_CLASS)
        idle_w, active_w, source = fallback.power_idle_w, fallback.power_active_w, "catalogue"
        if idle is not None and idle.power_w is not None and sampler is not None:
            idle_w = idle.power_w
            # Sensors average over a window and the benchmark is short: an active figure below
            # the idle one means the sampler caught nothing useful, so keep at least idle.
            active_w = idle_w
            if sampler.samples:
                active_w = max(idle_w, statistics.median(sampler.samples))
            source = "sysfs"
        profile = DeviceProfile(
            node_id=NodeId(node_id),
            device_class="host",
            gflops=host_gflops,
            memory_bytes=host_memory,
            cores=_host_cores(),
            power_idle_w=idle_w,
            power_active_w=active_w,
            # No sensor isolates the radio, so the extra draw while sending stays the catalogue's.
            power_tx_w=fallback.power_tx_w,
            battery_wh=(idle.battery_wh or 0.0) if idle is not None else 0.0,
            emulated=False,
            address=address,
            power_source=source,
            fleet_id=fleet_id,
        )
    if power_modes:
        top, *lower = power_modes
        profile = replace(
            profile,
            power_modes=(PowerMode(top.name, 1.0, profile.power_active_w), *lower),
        )
    _log.info(
        "device profiled",
        device_class=profile.device_class,
        emulated=profile.emulated,
        gflops=round(profile.gflops, 1),
        host_gflops=round(host_gflops, 1),
        memory_mib=profile.memory_bytes >> 20,
        power_source=profile.power_source,
    )
    return profile


def _emulated_profile(
    node_id: str,
    address: str,
    device: DeviceClass,
    *,
    host_gflops: float,
    host_memory: int,
    fleet_id: str,
) -> DeviceProfile:
    """A catalogue device's profile, capped by what this host really has."""
    gflops = device.gflops
    if host_gflops < gflops:
        _log.warning(
            "host slower than the emulated device; capping its speed",
            device_class=device.name,
            catalogue_gflops=device.gflops,
            host_gflops=round(host_gflops, 1),
        )
        gflops = host_gflops
    memory = device.usable_memory_bytes
    if host_memory < memory:
        _log.warning(
            "host has less free memory than the emulated device; capping it",
            device_class=device.name,
            catalogue_mib=memory >> 20,
            host_mib=host_memory >> 20,
        )
        memory = host_memory
    return DeviceProfile(
        node_id=NodeId(node_id),
        device_class=device.name,
        gflops=gflops,
        memory_bytes=memory,
        cores=device.cores,
        power_idle_w=device.power_idle_w,
        power_active_w=device.power_active_w,
        power_tx_w=device.power_tx_w,
        battery_wh=device.battery_wh or 0.0,
        emulated=True,
        address=address,
        power_source="catalogue",
        fleet_id=fleet_id,
    )


def _host_cores() -> int:
    """CPUs this process may run on (a container's cpuset), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
