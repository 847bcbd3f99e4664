"""The device catalogue: figures for the edge devices doramesh plans for and agents can emulate.

Used where a device cannot measure itself: an agent started with ``--emulate CLASS`` reports and
paces to these figures, and scenario files name a class instead of listing figures. A real device
running the agent measures its own speed and memory (``doramesh.agent.profiler``) instead.

How the figures are derived, so they can be checked and redone:

* ``gflops`` is the *effective* fp32 GFLOP/s a PyTorch-style workload reaches, not a marketing
  peak, because the planner divides layer FLOPs by it to predict stage times. Most sources publish
  HPL (Linpack, fp64), so CPUs are converted with one factor per ISA:

  - x86-64 with AVX2: effective = 2.0 x HPL. Calibrated on the development host (AMD EPYC Zen 3,
    2 vCPUs, torch 2.13 CPU, quiet machine): a 2048^3 fp64 matmul (the kernel HPL spends its time
    in) ran at 77 GFLOP/s with 2 threads (40 with 1), ``profiler.measure_gflops()`` at 164 (87),
    a ratio of 2.1 at both thread counts: fp32 doubles the SIMD lanes and oneDNN keeps most of
    its efficiency on these shapes. HPL scores a little below its GEMM rate (which raises the
    ratio) and small shapes spread worse over 4-8 cores than over 2 (which lowers it), so 2.0 is
    an *estimate* rounded from the measured 2.1.
  - Arm Cortex-A (NEON): effective = 1.0 x HPL. *Estimate*: fp32 doubles the lanes here too
    (x2), but PyTorch's aarch64 fp32 kernels reach about half the efficiency of the tuned BLAS
    HPL uses on these small shapes (x0.5); no Arm host was available to calibrate on. Check it
    on a board with
    ``python -c "from doramesh.agent.profiler import measure_gflops; print(measure_gflops())"``.
  - GPUs (Jetson): fp32 peak = CUDA cores x 2 x clock from NVIDIA's datasheet, times 0.3
    (*estimate*: cuBLAS reaches most of peak on large square matmuls, but model-sized layers,
    kernel-launch overhead from small Arm cores and the shared LPDDR bandwidth leave far less;
    check on a board with ``measure_gflops(device="cuda")``).
* ``usable_memory_bytes`` is what doramesh may take: total minus room for the OS, the agent
  process and torch itself (a few hundred MiB of runtime), and on Jetsons the CUDA context, since
  CPU and GPU share the same DRAM. The reserves are *estimates*.
* Power: ``power_idle_w`` is the whole device's draw when awake and idle; ``power_active_w`` its
  draw while computing flat out (HPL power where measured: HPL is dense floating-point work, as
  matmuls are); ``power_tx_w`` the *extra* draw of the network interface while sending, on top of
  idle (no source measures it per device, so all ``power_tx_w`` figures are estimates).
  ``battery_wh`` is ``None`` for mains-powered devices.

* Power modes (``power_modes``): the speeds a device can be switched to (Jetson ``nvpmodel``
  modes, an x86 package power limit, a cpufreq ``scaling_max_freq`` cap), each as a speed
  factor on ``gflops`` and the active draw in that mode. The first mode is the top one: factor
  1.0 and exactly ``power_active_w``, so a plan that runs flat out is priced as before. Lower
  clocks do less work per second but, as dynamic power goes with f x V^2 and the voltage falls
  with the clock, more work per joule until static and idle power dominate. Where a lower mode's
  power is published (a Jetson mode *is* its power budget) it is used; where it is measured on
  a sister board it is transferred as the draw above idle; elsewhere it is an *estimate* from
  one stated model: draw above idle scales with the speed factor squared,
  ``P(s) = idle + (active - idle) x s^2``. The exponent is calibrated on the one measured pair
  of the same chip at two power limits, the Intel N100 (below): speed 37.224 / 62.851 = 0.592,
  draw above idle (16 - 9.1) / (25 - 5.5) = 0.354, exponent ln 0.354 / ln 0.592 = 1.98. Speed
  factors of CPU modes are clock ratios (compute-bound work scales with the clock); of Jetson
  modes the GPU clock ratio (the figures are the GPU's).

Main measured source: Jeff Geerling's SBC benchmark data,
https://github.com/geerlingguy/sbc-reviews/blob/master/web/data/results.yml (HPL GFLOP/s, and power
at the wall: idle, and during HPL), one issue per board, cited below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from doramesh.errors import NotFound
from doramesh.types import PowerMode

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class DeviceClass:
    """One kind of device. See the module docstring for what each figure means."""

    name: str
    #: Effective fp32 GFLOP/s on PyTorch-style work (what stage-time predictions divide by).
    gflops: float
    memory_bytes: int
    #: What doramesh may use: total minus the OS, the agent process and torch.
    usable_memory_bytes: int
    cores: int
    power_idle_w: float
    power_active_w: float
    #: Extra draw while sending, on top of idle.
    power_tx_w: float
    #: Battery capacity; None when the device runs from the mains.
    battery_wh: float | None
    #: The torch device the figures assume ("cuda" on Jetsons); None = CPU.
    accelerator: str | None
    #: Modes it can be switched to, top mode first (factor 1.0 at ``power_active_w``).
    power_modes: tuple[PowerMode, ...] = ()


def _squared_model(name: str, speed: float, idle_w: float, active_w: float) -> PowerMode:
    """A lower mode priced by the module's estimate: draw above idle goes with speed^2."""
    return PowerMode(name, speed, round(idle_w + (active_w - idle_w) * speed**2, 2))


def _gib(n: float) -> int:
    return int(n * GIB)


_CLASSES = (
    # Raspberry Pi 4 Model B, 4 GB. Product brief (raspberrypi.com, "Raspberry Pi 4 Model B
    # product brief"): BCM2711, 4x Cortex-A72 at 1.8 GHz (boards since 2020; 1.5 GHz before),
    # 4 GB LPDDR4-3200. Geerling sbc-reviews issue #4: HPL 11.774 GFLOP/s; 1.6 W idle, 7.2 W
    # during HPL. Effective 1.0 x 11.774 = 11.8 (Arm factor, estimate). Usable: 4 GiB minus 1 GiB
    # for Raspberry Pi OS, the agent and torch (estimate). tx: estimate for the Ethernet/Wi-Fi
    # radio while streaming.
    # Modes: cpufreq caps (scaling_max_freq). 1.5 GHz, the clock of the first boards: factor
    # 1.5 / 1.8 = 0.833, power by the squared model (estimate).
    DeviceClass(
        name="raspberry-pi-4",
        gflops=11.8,
        memory_bytes=_gib(4),
        usable_memory_bytes=_gib(3),
        cores=4,
        power_idle_w=1.6,
        power_active_w=7.2,
        power_tx_w=0.6,
        battery_wh=None,
        accelerator=None,
        power_modes=(
            PowerMode("1.8GHz", 1.0, 7.2),
            _squared_model("1.5GHz", 1.5 / 1.8, 1.6, 7.2),
        ),
    ),
    # Raspberry Pi 5, 8 GB. Product brief (raspberrypi.com, "Raspberry Pi 5 product brief"):
    # BCM2712, 4x Cortex-A76 at 2.4 GHz, LPDDR4X-4267. Geerling sbc-reviews issue #21: HPL
    # 37.888 GFLOP/s; 2.8 W idle, 13.8 W during HPL (the top500-benchmark README lists an older
    # run: 30.249 GFLOP/s at 11 W). Effective 1.0 x 37.888 = 37.9 (Arm factor, estimate); for
    # scale, the fp32 NEON peak is 4 cores x 16 FLOP/cycle x 2.4 GHz = 153.6. Usable: 8 GiB minus
    # 1.5 GiB (estimate). tx: estimate, as for the Pi 4.
    # Modes: cpufreq caps. 1.5 GHz: factor 1.5 / 2.4 = 0.625, power by the squared model
    # (estimate).
    DeviceClass(
        name="raspberry-pi-5",
        gflops=37.9,
        memory_bytes=_gib(8),
        usable_memory_bytes=_gib(6.5),
        cores=4,
        power_idle_w=2.8,
        power_active_w=13.8,
        power_tx_w=0.6,
        battery_wh=None,
        accelerator=None,
        power_modes=(
            PowerMode("2.4GHz", 1.0, 13.8),
            _squared_model("1.5GHz", 1.5 / 2.4, 2.8, 13.8),
        ),
    ),
    # NVIDIA Jetson Nano (4 GB). NVIDIA Jetson Nano module datasheet: 128-core Maxwell GPU at
    # 921.6 MHz, "472 GFLOPS" (that is FP16), 4x Cortex-A57 at 1.43 GHz, 4 GB 64-bit LPDDR4 shared
    # by CPU and GPU, power modes 5 W and 10 W (MAXN, the default). fp32 peak = 128 x 2 x
    # 0.9216 GHz = 235.9 GFLOP/s; effective 0.3 x 235.9 = 70.8 (GPU factor, estimate). Active:
    # the 10 W MAXN module budget. Idle: estimate, module input rail at idle as commonly read from
    # tegrastats (about 1.2-2 W). Usable: 4 GiB minus 1.5 GiB for L4T, the CUDA context and torch
    # (estimate). tx: estimate.
    # Modes (NVIDIA Jetson Linux developer guide, "Power Management for Jetson Nano", nvpmodel
    # table): MAXN (10 W, GPU up to 921.6 MHz) and 5W (GPU up to 640 MHz, two CPU cores at
    # 918 MHz): factor 640 / 921.6 = 0.694, active power the mode's 5 W budget.
    DeviceClass(
        name="jetson-nano",
        gflops=70.8,
        memory_bytes=_gib(4),
        usable_memory_bytes=_gib(2.5),
        cores=4,
        power_idle_w=1.5,
        power_active_w=10.0,
        power_tx_w=0.6,
        battery_wh=None,
        accelerator="cuda",
        power_modes=(
            PowerMode("MAXN", 1.0, 10.0),
            PowerMode("5W", 640 / 921.6, 5.0),
        ),
    ),
    # NVIDIA Jetson Orin Nano 8 GB. NVIDIA Jetson Orin Nano series datasheet: 1024-core Ampere GPU
    # (32 tensor cores) at up to 625 MHz, 6x Cortex-A78AE, 8 GB 128-bit LPDDR5 (68 GB/s) shared,
    # power modes 7 W and 15 W. fp32 peak = 1024 x 2 x 0.625 GHz = 1280 GFLOP/s; effective 0.3 x
    # 1280 = 384 (GPU factor, estimate). JetPack 6.1's "Super" mode (1020 MHz GPU, 25 W) is not
    # assumed. Active: the 15 W mode budget. Idle: estimate (no published figure; module plus
    # carrier at desktop idle). Usable: 8 GiB minus 2 GiB for JetPack, the CUDA context and torch
    # (estimate). tx: estimate.
    # Modes (NVIDIA Jetson Linux developer guide, "Power Management for Jetson Orin Nano",
    # nvpmodel table): 15W (GPU up to 625 MHz) and 7W (GPU up to 408 MHz): factor 408 / 625 =
    # 0.653, active power the mode's 7 W budget.
    DeviceClass(
        name="jetson-orin-nano",
        gflops=384.0,
        memory_bytes=_gib(8),
        usable_memory_bytes=_gib(6),
        cores=6,
        power_idle_w=4.0,
        power_active_w=15.0,
        power_tx_w=0.6,
        battery_wh=None,
        accelerator="cuda",
        power_modes=(
            PowerMode("15W", 1.0, 15.0),
            PowerMode("7W", 408 / 625, 7.0),
        ),
    ),
    # Google Pixel 8. Google Pixel 8 tech specs (store.google.com): Tensor G3, 8 GB LPDDR5X,
    # battery 4575 mAh typical. Battery: 4575 mAh x 3.87 V = 17.7 Wh (the cell voltage is an
    # estimate: Google does not publish it; 3.85-3.89 V is usual for Li-ion phone cells).
    # Tensor G3 CPU: 1x Cortex-X3 at 2.91 GHz, 4x Cortex-A715 at 2.37 GHz, 4x Cortex-A510 at
    # 1.70 GHz. gflops is an *estimate*, as no public HPL exists: fp32 NEON peak from the core
    # mix is about 300 GFLOP/s (X3 32, A715 16, A510 8 FLOP/cycle); PyTorch on Arm reaches about
    # 25% of peak (the Pi 5 above: 37.9 of 153.6), and a fanless phone throttles under sustained
    # load (derated to 0.7), so 300 x 0.25 x 0.7 = 52. The Edge TPU is not reachable from PyTorch,
    # so the figures are the CPU's. Power (estimates): 0.5 W idle with the screen off, Wi-Fi on
    # and a wake lock held (the agent keeps the CPU awake); 6 W sustained all-core load before
    # throttling; 1.0 W extra for Wi-Fi transmit. Usable: 3 GiB of 8 GB, since Android keeps
    # its system and cached apps resident (estimate).
    # Modes: a cpufreq cap at 60% of each cluster's top clock (factor 0.6; Android exposes
    # scaling_max_freq to root only), power by the squared model (estimate).
    DeviceClass(
        name="pixel-8",
        gflops=52.0,
        memory_bytes=_gib(8),
        usable_memory_bytes=_gib(3),
        cores=9,
        power_idle_w=0.5,
        power_active_w=6.0,
        power_tx_w=1.0,
        battery_wh=17.7,
        accelerator=None,
        power_modes=(
            PowerMode("max", 1.0, 6.0),
            _squared_model("cap-60", 0.6, 0.5, 6.0),
        ),
    ),
    # A thin-and-light x86 laptop, modelled on the Framework Laptop 13 (AMD Ryzen 7040 series).
    # Geerling sbc-reviews issue #90: HPL 88.787 GFLOP/s; 2.7 W idle, 41.6 W during HPL.
    # Effective 2.0 x 88.787 = 178 (x86 factor). That HPL run is far below this CPU's fp64 peak
    # (about 400 GFLOP/s for a Ryzen 7 7840U's 8 Zen 4 cores), probably power-limited, so the
    # figure is conservative. Battery: 61 Wh (Framework Laptop 13 AMD spec sheet). Cores: 8
    # assumes the Ryzen 7 7840U (the Ryzen 5 7640U has 6). Memory: 16 GiB is a typical
    # configuration (estimate); usable 12 GiB, since a laptop is also someone's workstation.
    # tx: estimate for Wi-Fi transmit. Also the fallback power model of an agent that runs on a
    # host without power sensors.
    # Modes: a cpufreq cap at 60% of the top clock (amd-pstate scaling_max_freq, what a
    # "power-saver" profile sets), factor 0.6, power by the squared model (estimate).
    DeviceClass(
        name="laptop-x86",
        gflops=178.0,
        memory_bytes=_gib(16),
        usable_memory_bytes=_gib(12),
        cores=8,
        power_idle_w=2.7,
        power_active_w=41.6,
        power_tx_w=1.0,
        battery_wh=61.0,
        accelerator=None,
        power_modes=(
            PowerMode("max", 1.0, 41.6),
            _squared_model("cap-60", 0.6, 2.7, 41.6),
        ),
    ),
    # A fanless Intel N100 mini PC / edge box. Intel ark, Intel Processor N100: 4 cores (E-cores),
    # up to 3.4 GHz, 6 W processor base power, 16 GB maximum memory (single channel). Geerling
    # sbc-reviews issue #42 (LattePanda Mu, N100): HPL 62.851 GFLOP/s; 5.5 W idle, 25 W during
    # HPL (the board lifts the power limit far above the 6 W base; the Radxa X4, also N100, holds
    # a lower limit and reached 37.224 GFLOP/s at 16 W, issue #48). Effective 2.0 x 62.851 = 126
    # (x86 factor). Memory: the 16 GB maximum; usable 14 GiB for a headless box (estimate).
    # tx: estimate for wired Ethernet.
    # Modes: the package power limit (PL1). The board above runs it high; the Radxa X4 holds
    # it low and reached 37.224 GFLOP/s at 16 W with 9.1 W idle (issue #48): factor 37.224 /
    # 62.851 = 0.592, and its 6.9 W above idle added to this board's 5.5 W idle gives 12.4 W
    # (the transfer between boards is an estimate).
    DeviceClass(
        name="mini-pc",
        gflops=126.0,
        memory_bytes=_gib(16),
        usable_memory_bytes=_gib(14),
        cores=4,
        power_idle_w=5.5,
        power_active_w=25.0,
        power_tx_w=0.5,
        battery_wh=None,
        accelerator=None,
        power_modes=(
            PowerMode("pl-high", 1.0, 25.0),
            PowerMode("pl-low", 37.224 / 62.851, 12.4),
        ),
    ),
)

CATALOGUE: Mapping[str, DeviceClass] = MappingProxyType({c.name: c for c in _CLASSES})


def get_class(name: str) -> DeviceClass:
    """The catalogue entry called ``name``; ``NotFound`` names the valid classes otherwise."""
    try:
        return CATALOGUE[name]
    except KeyError:
        valid = ", ".join(sorted(CATALOGUE))
        raise NotFound(f"unknown device class {name!r}; known classes: {valid}") from None
