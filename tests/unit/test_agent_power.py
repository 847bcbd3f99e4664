"""An agent's power-mode switch: it applies a mode or refuses, and advertises only what it can."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from doramesh.agent import power, profiler
from doramesh.agent.catalogue import get_class
from doramesh.agent.pacing import ComputePacer
from doramesh.agent.power import PowerModeSwitch
from doramesh.errors import FailedPrecondition
from doramesh.types import PowerMode

MODES = (PowerMode("top", 1.0, 10.0), PowerMode("low", 0.5, 4.0))


def test_emulating_agent_paces_to_the_modes_speed_and_back() -> None:
    pacer = ComputePacer(20.0)
    switch = power.paced_switch(MODES, pacer)
    assert pacer.target_seconds(2.0, 0.01) == pytest.approx(0.1)
    switch.apply("low")
    assert switch.current == "low"
    assert pacer.target_seconds(2.0, 0.01) == pytest.approx(0.2)
    switch.apply("")
    assert switch.current == ""
    assert pacer.target_seconds(2.0, 0.01) == pytest.approx(0.1)
    with pytest.raises(FailedPrecondition, match=r"no power mode 'turbo'.*top, low"):
        switch.apply("turbo")


def test_an_agent_without_a_switch_refuses_every_lower_mode() -> None:
    switch = power.no_switch()
    assert switch.modes == ()
    switch.apply("")  # the top mode is what it runs in anyway
    with pytest.raises(FailedPrecondition, match="cannot switch power modes"):
        switch.apply("low")
    with pytest.raises(ValueError):
        ComputePacer(None).speed_factor = 0.5  # a real host is not paced
    with pytest.raises(ValueError, match="top one"):
        PowerModeSwitch((MODES[1], MODES[0]), lambda _m: None)


def test_mode_command_reports_failure_and_keeps_the_mode_it_had() -> None:
    script = "import sys; sys.exit(0 if sys.argv[1] == 'low' else 3)"
    switch = power.command_switch([sys.executable, "-c", script], MODES)
    switch.apply("low")
    assert switch.current == "low"
    with pytest.raises(FailedPrecondition, match="exited 3"):
        switch.apply("top")
    assert switch.current == "low"
    missing = power.command_switch(["/nonexistent/doramesh-mode"], MODES)
    with pytest.raises(FailedPrecondition, match="command failed"):
        missing.apply("low")


def _policies(root: Path, count: int, top_khz: int) -> list[Path]:
    out = []
    for k in range(count):
        p = root / "devices" / "system" / "cpu" / "cpufreq" / f"policy{k}"
        p.mkdir(parents=True)
        (p / "cpuinfo_max_freq").write_text(f"{top_khz}\n")
        (p / "scaling_max_freq").write_text(f"{top_khz}\n")
        out.append(p)
    return out


def test_cpufreq_caps_every_policy_and_restores_the_top(tmp_path: Path) -> None:
    policies = _policies(tmp_path, 2, 2_400_000)
    switch = power.cpufreq_switch(MODES, tmp_path)
    assert switch.modes == MODES
    switch.apply("low")
    assert [(p / "scaling_max_freq").read_text() for p in policies] == ["1200000\n"] * 2
    switch.apply("")
    assert [(p / "scaling_max_freq").read_text() for p in policies] == ["2400000\n"] * 2


def test_cpufreq_offers_no_modes_without_policies(tmp_path: Path) -> None:
    assert power.cpufreq_switch(MODES, tmp_path).modes == ()


def test_profile_advertises_the_switchs_modes_with_its_own_top_power(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(profiler, "measure_gflops", lambda *_a, **_k: 1000.0)
    pi5 = get_class("raspberry-pi-5")
    plain = profiler.build_profile("p", "h:1", emulate="raspberry-pi-5", sys_root=tmp_path)
    assert plain.power_modes == ()  # nothing applies modes: none advertised
    moded = profiler.build_profile(
        "p", "h:1", emulate="raspberry-pi-5", sys_root=tmp_path, power_modes=pi5.power_modes
    )
    assert moded.power_modes == pi5.power_modes
    real = profiler.build_profile(
        "p", "h:1", memory_limit_bytes=1 << 26, sys_root=tmp_path, power_modes=MODES
    )
    assert real.power_modes[0] == PowerMode("top", 1.0, real.power_active_w)
    assert real.power_modes[1:] == MODES[1:]


def test_a_device_serving_several_plans_runs_the_fastest_mode_they_ask_for() -> None:
    modes = get_class("raspberry-pi-5").power_modes
    switch = power.paced_switch(modes, ComputePacer(10.0))
    top, low = (m.name for m in modes)
    assert switch.fastest([]) == ""
    assert switch.fastest([low, low]) == low
    assert switch.fastest([low, ""]) == ""
    assert switch.fastest([low, top]) == ""
    # A name the device does not have is refused even next to the top mode.
    with pytest.raises(FailedPrecondition, match="9GHz"):
        switch.fastest(["", "9GHz"])
    with pytest.raises(FailedPrecondition, match="none"):
        power.no_switch().fastest(["1.5GHz"])
