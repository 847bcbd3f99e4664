"""Power modes on an agent: switch this device to the mode a plan names, or refuse.

The planner may run a device in a lower power mode (``DeviceShare.mode``; the modes and their
figures are in ``doramesh.agent.catalogue``). A plan must not count on a mode nobody applies, so
an agent's profile lists only the modes its switch can apply (``PowerModeSwitch.modes``, passed
to ``profiler.build_profile``), and ``apply`` raises ``FailedPrecondition`` rather than pretend:

- *emulating* (``--emulate CLASS``): the class's catalogue modes, applied by pacing: the compute
  pacer's speed factor becomes the mode's, so the emulated device computes as slowly as it would
  in that mode (its draw is the catalogue's figure for the mode; nothing is measured);
- *a command* (opt in): ``command_switch(argv, modes)`` runs ``argv + [MODE]`` (no shell, with a
  timeout); exit status 0 means applied. The operator lists the modes it stands for with their
  figures, top mode first: an agent cannot measure a mode it has not switched to. On a Jetson
  the command would wrap ``nvpmodel -m ID``; on an x86 box one that sets the package power limit;
- *cpufreq* (opt in): ``cpufreq_switch(modes, sys_root)`` writes ``scaling_max_freq`` = the
  mode's speed factor x ``cpuinfo_max_freq`` on every cpufreq policy; offered only where those
  files are writable (root), so an unprivileged agent offers no modes;
- otherwise *none*: the profile lists no modes and every plan runs the device as it is.

The top mode ("" in a plan, or its name) restores full speed.

A plan's mode reaches the agent in ``LoadStageRequest.power_mode``. The servicer switches before
loading the stage and fails the load with ``FAILED_PRECONDITION`` if the switch refuses. A device
serving stages of several plans runs the fastest mode any of them asks for (``fastest``), so no
plan runs slower than it was priced; it goes back down when those stages are unloaded.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import structlog

from doramesh.agent.pacing import ComputePacer
from doramesh.errors import FailedPrecondition
from doramesh.types import PowerMode

_log = structlog.get_logger("agent.power")

#: Seconds a mode command may take before the switch counts as failed.
COMMAND_TIMEOUT_S = 10.0

Applier = Callable[[PowerMode], None]


class PowerModeSwitch:
    """The power modes this agent can apply, top mode first, and the one it runs in."""

    def __init__(self, modes: Sequence[PowerMode], applier: Applier | None) -> None:
        if modes and applier is None:
            raise ValueError("modes need a way to apply them")
        if modes and modes[0].speed_factor != 1.0:
            raise ValueError("the first mode must be the top one (speed_factor 1)")
        self.modes = tuple(modes)
        self._applier = applier
        self.current = ""

    def apply(self, mode: str) -> None:
        """Run in ``mode`` ("" = the top mode); ``FailedPrecondition`` if this agent cannot."""
        if mode == self.current:
            return
        if not self.modes:
            raise FailedPrecondition(f"this agent cannot switch power modes (asked for {mode!r})")
        target = (
            self.modes[0] if not mode else next((m for m in self.modes if m.name == mode), None)
        )
        if target is None:
            names = ", ".join(m.name for m in self.modes)
            raise FailedPrecondition(f"no power mode {mode!r} on this agent; it has: {names}")
        assert self._applier is not None
        self._applier(target)
        self.current = "" if target is self.modes[0] else target.name
        _log.info("power mode applied", mode=target.name, speed_factor=target.speed_factor)

    def fastest(self, names: Iterable[str]) -> str:
        """The fastest of ``names`` ("" = the top mode): what a device serving stages of several
        plans must run in so that none of them misses its prediction. An empty set is the top
        mode; a name this agent does not have raises ``FailedPrecondition``."""
        speeds = {m.name: m.speed_factor for m in self.modes}
        wanted = set(names)
        for name in sorted(wanted - {""}):
            if name not in speeds:
                raise FailedPrecondition(
                    f"no power mode {name!r} on this agent; it has: {', '.join(speeds) or 'none'}"
                )
        if not wanted or "" in wanted:
            return ""
        best = max(wanted, key=lambda name: speeds[name])
        return "" if best == self.modes[0].name else best


def no_switch() -> PowerModeSwitch:
    return PowerModeSwitch((), None)


def paced_switch(modes: Sequence[PowerMode], pacer: ComputePacer) -> PowerModeSwitch:
    """An emulating agent's modes, applied by pacing to the mode's fraction of the speed."""

    def apply(mode: PowerMode) -> None:
        pacer.speed_factor = mode.speed_factor

    return PowerModeSwitch(modes, apply)


def command_switch(
    argv: Sequence[str], modes: Sequence[PowerMode], *, timeout_s: float = COMMAND_TIMEOUT_S
) -> PowerModeSwitch:
    """Modes applied by running ``argv + [name]``; a non-zero exit or a timeout refuses."""
    if not argv:
        raise ValueError("the power mode command is empty")

    def apply(mode: PowerMode) -> None:
        try:
            done = subprocess.run(
                [*argv, mode.name], capture_output=True, timeout=timeout_s, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise FailedPrecondition(f"power mode command failed for {mode.name!r}: {err}") from err
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip()[-200:]
            raise FailedPrecondition(
                f"power mode command exited {done.returncode} for {mode.name!r}: {tail}"
            )

    return PowerModeSwitch(modes, apply)


def cpufreq_switch(modes: Sequence[PowerMode], sys_root: Path = Path("/sys")) -> PowerModeSwitch:
    """Modes applied as cpufreq caps, or no modes where the caps cannot be written."""
    base = sys_root / "devices" / "system" / "cpu" / "cpufreq"
    policies = sorted(base.glob("policy*")) if base.is_dir() else []
    writable = [
        p
        for p in policies
        if (p / "cpuinfo_max_freq").is_file() and os.access(p / "scaling_max_freq", os.W_OK)
    ]
    if not modes or not writable or len(writable) != len(policies):
        _log.info("cpufreq power modes unavailable", policies=len(policies), writable=len(writable))
        return no_switch()

    def apply(mode: PowerMode) -> None:
        try:
            for policy in writable:
                top_khz = int((policy / "cpuinfo_max_freq").read_text().strip())
                cap = max(1, round(top_khz * mode.speed_factor))
                (policy / "scaling_max_freq").write_text(f"{cap}\n")
        except (OSError, ValueError) as err:
            raise FailedPrecondition(f"cpufreq cap for {mode.name!r} failed: {err}") from err

    return PowerModeSwitch(modes, apply)
