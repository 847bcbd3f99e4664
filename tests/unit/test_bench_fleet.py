"""bench fleet's pure parts: how the dilation follows the box's load, refusing an agent with no
headroom, and which power modes a plan runs its devices in."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from doramesh.bench import fleet
from doramesh.scenario import load_scenario
from doramesh.types import DeviceShare, NodeId, Plan, PlanId, Prediction, StagePlan

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "smart-home-assistant.yaml"


def _plan(*stages: tuple[int, int, str, str]) -> Plan:
    return Plan(
        PlanId("p"),
        tuple(StagePlan(a, b, (DeviceShare(NodeId(d), 1.0, mode),)) for a, b, d, mode in stages),
        1,
        (),
        Prediction(200.0, 5.0, 4.0),
    )


def test_dilation_grows_as_other_work_takes_the_cores() -> None:
    scenario = load_scenario(SCENARIO)
    plans = [_plan((0, 25, "laptop", ""))]
    idle = fleet.choose_dilation(scenario, plans, 1.0)
    busy = fleet.choose_dilation(scenario, plans, 0.25)
    assert busy >= 4 * idle - 1  # a quarter of the cores: about four times slower
    assert fleet.choose_dilation(scenario, plans) == idle


def test_host_share_is_cores_over_load_above_the_core_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fleet.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(fleet.os, "getloadavg", lambda: (8.0, 0.0, 0.0))
    assert fleet.host_share() == 0.25
    monkeypatch.setattr(fleet.os, "getloadavg", lambda: (1.0, 0.0, 0.0))
    assert fleet.host_share() == 1.0


class _Testbed:
    coordinator_address = "unused"

    def __init__(self) -> None:
        self.slowed: dict[str, float] = {}

    def slow(self, node_id: str, factor: float) -> None:
        self.slowed[node_id] = factor


def test_dilate_refuses_an_agent_without_headroom(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = load_scenario(SCENARIO)
    # The agents report a host as fast as each device: at k=1 none could be slowed at all.
    reported = [
        SimpleNamespace(profile=SimpleNamespace(node_id=d.node_id, gflops=d.gflops))
        for d in scenario.devices
    ]

    class Client:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *args: object) -> None:
            pass

        def fleet(self) -> list[Any]:
            return reported

    monkeypatch.setattr("doramesh.sdk.Client", Client)
    tb = _Testbed()
    with pytest.raises(RuntimeError, match="--dilation"):
        fleet.dilate(tb, scenario, 1.0)
    assert tb.slowed == {}
    slowdowns = fleet.dilate(tb, scenario, 4.0)
    assert tb.slowed == slowdowns == {d.node_id: 4.0 for d in scenario.devices}


def test_plan_modes_name_each_device_once() -> None:
    plan = _plan((0, 19, "laptop", "cap-60"), (20, 25, "phone-anna", ""))
    assert fleet.plan_modes(plan) == {"laptop": "cap-60", "phone-anna": ""}


def _record(planner: str, **extra: Any) -> dict[str, Any]:
    figures = {
        "latency_ms_p50": 200.0,
        "latency_ms_p95": 210.0,
        "throughput_sps": 2.0,
        "energy_j_per_sample": 4.0,
    }
    return {
        "scenario": "s",
        "planner": planner,
        "objective": "min_energy",
        "feasible": True,
        "dilation": 20.0,
        "measured": figures,
        "predicted": {**figures, "latency_ms_p50": 190.0},
        "simulated": figures,
        "qoe_met": True,
        **extra,
    }


def test_a_failed_baseline_is_reported_not_compared() -> None:
    failed = {
        "scenario": "s",
        "planner": "throughput-optimal",
        "feasible": True,
        "failed": "DeadlineExceeded('slow')",
        "dilation": 20.0,
    }
    records = [_record("doramesh"), failed]
    table = fleet.render(records)
    assert "failed: DeadlineExceeded('slow')" in table
    (row,) = fleet.summarise(records)
    assert row["throughput_optimal_failed"] == "DeadlineExceeded('slow')"
    assert "ahead" not in row and row["doramesh"] == 4.0
    assert row["latency_error"] == pytest.approx(10 / 190)


def test_doramesh_ahead_compares_the_measured_objective() -> None:
    theirs = _record("throughput-optimal")
    theirs["measured"] = {**theirs["measured"], "energy_j_per_sample": 7.0}
    (row,) = fleet.summarise([_record("doramesh"), theirs])
    assert row["ahead"] is True and row["doramesh"] == 4.0 and row["throughput_optimal"] == 7.0
