"""The planner bench: records in DESIGN.md's format, scored by the simulator."""

from __future__ import annotations

from pathlib import Path

from doramesh.bench.planner import render, run_planner_bench

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {
    "scenario",
    "planner",
    "feasible",
    "qoe_met",
    "latency_ms",
    "throughput_sps",
    "energy_j_per_sample",
    "qoe_violation_rate",
    "plan_seconds",
    "plan",
}


def test_records_and_summary_on_one_scenario() -> None:
    result = run_planner_bench(
        ROOT / "scenarios" / "doorbell-resnet18.yaml",
        planners=("doramesh", "uniform", "throughput-optimal"),
        progress=False,
    )
    records = result["records"]
    assert [r["planner"] for r in records] == ["doramesh", "uniform", "throughput-optimal"]
    for r in records:
        assert FIELDS <= set(r)
        if r["feasible"]:
            assert r["plan"]["plans"], r
            assert r["throughput_sps"] > 0
    ours = records[0]
    assert ours["feasible"] and ours["qoe_met"]
    summary = result["summary"]
    assert summary["qoe_met_wherever_any_planner_does"] is True
    assert "doorbell-resnet18" in summary["prediction_error"]
    table = render(result)
    assert "| doorbell-resnet18 |" in table and "throughput-optimal" in table


def test_an_unknown_planner_is_a_record_not_a_crash() -> None:
    result = run_planner_bench(
        ROOT / "scenarios" / "doorbell-resnet18.yaml", planners=("nope",), progress=False
    )
    (record,) = result["records"]
    assert not record["feasible"] and "unknown planner" in record["error"]
