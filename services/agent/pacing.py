"""Compute pacing: make this host take as long as the device it emulates would.

An agent started with ``--emulate raspberry-pi-4`` runs its stages on whatever CPU it has, then
waits out the difference between the host's time and the emulated device's time (the stage's
GFLOPs divided by the catalogue's effective GFLOP/s). Measured stage times, and therefore the
adapter's view of the fleet, then look like a fleet of real devices.

A power mode (``doramesh.agent.power``) sets ``speed_factor``: an emulated device in a lower
mode is paced to that fraction of its speed, as the real device would run at the lower clock.

``slowdown`` is the fault hook for "this agent got 3x slower" (thermal throttling, a competing
process): it multiplies the time a call must take, at run time, without touching the profile.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ComputePacer:
    """Paces calls to ``target_gflops`` (effective GFLOP/s), or only by ``slowdown`` if it is None.

    Without a target the host runs at its own speed; ``slowdown`` > 1 still stretches each call to
    ``slowdown`` times its measured wall time, so a non-emulating agent can be slowed in tests too.
    A pacer can only slow work down: a call that is already slower than the target is not waited on.
    """

    def __init__(self, target_gflops: float | None, *, slowdown: float = 1.0) -> None:
        if target_gflops is not None and (not math.isfinite(target_gflops) or target_gflops <= 0):
            raise ValueError(f"target_gflops must be positive, not {target_gflops!r}")
        self._top_gflops = target_gflops
        self._speed_factor = 1.0
        self._slowdown = 1.0
        self.slowdown = slowdown

    @property
    def target_gflops(self) -> float | None:
        """The speed calls are paced to: the emulated device's, times ``speed_factor``."""
        if self._top_gflops is None:
            return None
        return self._top_gflops * self._speed_factor

    @property
    def speed_factor(self) -> float:
        return self._speed_factor

    @speed_factor.setter
    def speed_factor(self, factor: float) -> None:
        """Pace to ``factor`` of the emulated speed (a power mode's; 1 = the top mode)."""
        if self._top_gflops is None:
            raise ValueError("only an emulating pacer runs at a power mode's speed")
        if not (math.isfinite(factor) and 0 < factor <= 1):
            raise ValueError(f"speed_factor must be in (0, 1], not {factor!r}")
        self._speed_factor = float(factor)

    @property
    def slowdown(self) -> float:
        return self._slowdown

    @slowdown.setter
    def slowdown(self, factor: float) -> None:
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"slowdown must be a positive factor, not {factor!r}")
        self._slowdown = float(factor)

    def target_seconds(self, gflops: float, measured_s: float) -> float:
        """How long a call of ``gflops`` GFLOP that took ``measured_s`` here must appear to take."""
        target = self.target_gflops
        if target is None:
            base = measured_s
        else:
            base = max(gflops, 0.0) / target
        return max(measured_s, base * self._slowdown)

    async def run(self, fn: Callable[[], T], gflops: float) -> tuple[T, float]:
        """Run ``fn`` in a worker thread, then sleep until the emulated device would be done.

        Returns the result and the paced wall time in seconds (what the emulated device took).
        The event loop stays free while ``fn`` runs and while the pacer waits.
        """
        start = time.perf_counter()
        result = await asyncio.to_thread(fn)
        measured = time.perf_counter() - start
        target = self.target_seconds(gflops, measured)
        if target > measured:
            await asyncio.sleep(target - measured)
        return result, time.perf_counter() - start

    def run_sync(self, fn: Callable[[], T], gflops: float) -> tuple[T, float]:
        """Blocking variant of :meth:`run`, for code that already runs off the event loop."""
        start = time.perf_counter()
        result = fn()
        measured = time.perf_counter() - start
        target = self.target_seconds(gflops, measured)
        if target > measured:
            time.sleep(target - measured)
        return result, time.perf_counter() - start
