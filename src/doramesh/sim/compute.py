"""Devices as compute servers: one FIFO queue per device, shared by every stage and plan on it.

A device runs one task at a time (as the agent's runtime does: stages take turns on one compute
lock). A slowdown takes effect mid-task: the work left is finished at the new speed. A device that
leaves drops its running and queued tasks; the caller loses their owners.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from doramesh.sim.engine import Callback, EventQueue, Owner


@dataclass(slots=True, eq=False)
class Task:
    gflop: float
    owner: Owner
    on_done: Callback


class Processor:
    """One device's compute: its queue, its running task, and what it has spent."""

    __slots__ = (
        "alive",
        "alive_s",
        "alive_since",
        "busy_s",
        "current",
        "gflops",
        "node",
        "queue",
        "remaining",
        "segment_start",
        "slowdown",
        "version",
    )

    def __init__(self, node: str, gflops: float) -> None:
        self.node = node
        self.gflops = gflops
        self.slowdown = 1.0
        self.alive = True
        self.alive_since = 0.0
        self.alive_s = 0.0
        self.busy_s = 0.0
        self.queue: deque[Task] = deque()
        self.current: Task | None = None
        self.remaining = 0.0  # GFLOP of the running task not yet done at ``segment_start``
        self.segment_start = 0.0
        # Bumped whenever the running task's finish time changes, so stale finish events are
        # recognised and ignored instead of being removed from the heap.
        self.version = 0

    def seconds_for(self, gflop: float) -> float:
        if gflop <= 0:
            return 0.0
        if self.gflops <= 0:
            return math.inf
        return gflop * self.slowdown / self.gflops


class ComputePool:
    def __init__(self, events: EventQueue, devices: Iterable[tuple[str, float]]) -> None:
        self._events = events
        self.processors = {node: Processor(node, gflops) for node, gflops in devices}

    def submit(self, node: str, task: Task) -> bool:
        """Queue a task; False when the device is gone (the caller loses the owner)."""
        proc = self.processors[node]
        if not proc.alive:
            return False
        proc.queue.append(task)
        if proc.current is None:
            self._start_next(proc)
        return True

    def _start_next(self, proc: Processor) -> None:
        queue = proc.queue
        while queue:
            task = queue.popleft()
            if task.owner.lost:  # its request is gone: do not spend the device on it
                continue
            proc.current = task
            proc.remaining = task.gflop
            proc.segment_start = self._events.now
            self._schedule_finish(proc)
            return
        proc.current = None

    def _schedule_finish(self, proc: Processor) -> None:
        proc.version += 1
        seconds = proc.seconds_for(proc.remaining)
        if math.isinf(seconds):
            return  # a device with no compute never finishes; the run ends with the work lost
        version = proc.version
        self._events.after(seconds, lambda: self._finish(proc, version))

    def _finish(self, proc: Processor, version: int) -> None:
        if version != proc.version or proc.current is None:
            return
        now = self._events.now
        proc.busy_s += now - proc.segment_start
        task = proc.current
        # The queue keeps its FIFO order: the next queued task starts before the finished task's
        # callback can queue more work on this device.
        self._start_next(proc)
        task.on_done()

    def set_slowdown(self, node: str, factor: float) -> None:
        """The device now computes ``factor`` times slower than its profile (1.0: nominal)."""
        proc = self.processors[node]
        now = self._events.now
        if proc.current is not None:
            elapsed = now - proc.segment_start
            proc.busy_s += elapsed
            if proc.gflops > 0:
                proc.remaining = max(0.0, proc.remaining - elapsed * proc.gflops / proc.slowdown)
            proc.segment_start = now
        proc.slowdown = factor
        if proc.current is not None:
            self._schedule_finish(proc)

    def leave(self, node: str) -> list[Owner]:
        """The device goes away: its running and queued work is lost. Returns their owners."""
        proc = self.processors[node]
        if not proc.alive:
            return []
        now = self._events.now
        proc.alive = False
        proc.alive_s += now - proc.alive_since
        owners: list[Owner] = []
        if proc.current is not None:
            proc.busy_s += now - proc.segment_start
            owners.append(proc.current.owner)
            proc.current = None
        owners.extend(task.owner for task in proc.queue)
        proc.queue.clear()
        proc.version += 1
        return owners

    def join(self, node: str) -> None:
        proc = self.processors[node]
        if proc.alive:
            return
        proc.alive = True
        proc.alive_since = self._events.now

    def close(self, wall_s: float) -> None:
        """Account the running segments and alive time up to the end of the run."""
        for proc in self.processors.values():
            if proc.current is not None and wall_s > proc.segment_start:
                proc.busy_s += wall_s - proc.segment_start
                proc.segment_start = wall_s
            if proc.alive and wall_s > proc.alive_since:
                proc.alive_s += wall_s - proc.alive_since
                proc.alive_since = wall_s
