"""The simulator's clock: a heap of timed callbacks.

Ties break in scheduling order (a sequence number), so two events at the same instant run in the
order they were scheduled and a run is reproducible without ever comparing callbacks.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Protocol

Callback = Callable[[], None]


class Owner(Protocol):
    """What a piece of work belongs to: a request or a training step, which may be lost."""

    @property
    def lost(self) -> bool: ...


class EventQueue:
    __slots__ = ("_heap", "_seq", "now")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callback]] = []
        self._seq = 0
        self.now = 0.0

    def at(self, time: float, fn: Callback) -> None:
        # Never schedule into the past: float rounding of ``now + dt`` must not reorder time.
        heapq.heappush(self._heap, (max(time, self.now), self._seq, fn))
        self._seq += 1

    def after(self, delay: float, fn: Callback) -> None:
        self.at(self.now + delay, fn)

    def __len__(self) -> int:
        return len(self._heap)

    def run_next(self) -> None:
        time, _, fn = heapq.heappop(self._heap)
        self.now = time
        fn()
