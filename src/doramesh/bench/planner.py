"""``doramesh bench planner``: every planner on every scenario, scored by the simulator.

The planners' own predictions are not trusted for the comparison: each plan set is run through
the discrete-event simulator (``doramesh.simulator``), which shares no code with the planner's
cost model. For doramesh's plans the bench also reports how far the planner's prediction is
from the simulation (the issue's "prediction vs simulation" check), on the static fleet.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from doramesh import convert
from doramesh.errors import DoraMeshError
from doramesh.planner import api
from doramesh.scenario import load_scenarios
from doramesh.scenario_types import Scenario
from doramesh.simulator import SimResult, simulate
from doramesh.types import Plan, PlanSet

#: The planners compared, ours first.
PLANNERS: tuple[str, ...] = (
    "doramesh",
    "single-device",
    "uniform",
    "memory-proportional",
    "throughput-optimal",
    "latency-optimal",
    "data-parallel",
)
#: A run meets its latency SLO when at most this fraction of requests miss it.
MAX_VIOLATION_RATE = 0.05
#: Requests arrive at the scenario's rate, evenly spaced: the frame rate of a camera or a
#: sensor. (Poisson arrivals add queueing that no planner here models; the simulator has them.)
ARRIVALS: Final = "periodic"


@dataclass(frozen=True, slots=True)
class Record:
    scenario: str
    planner: str
    objective: str
    feasible: bool
    qoe_met: bool
    latency_ms: float | None
    latency_ms_p95: float | None
    throughput_sps: float | None
    energy_j_per_sample: float | None
    qoe_violation_rate: float | None
    plan_seconds: float
    plan: dict[str, Any] | None
    predicted: dict[str, float] | None
    static: dict[str, float | None] | None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "planner": self.planner,
            "objective": self.objective,
            "feasible": self.feasible,
            "qoe_met": self.qoe_met,
            "latency_ms": self.latency_ms,
            "latency_ms_p95": self.latency_ms_p95,
            "throughput_sps": self.throughput_sps,
            "energy_j_per_sample": self.energy_j_per_sample,
            "qoe_violation_rate": self.qoe_violation_rate,
            "plan_seconds": self.plan_seconds,
            "plan": self.plan,
            "predicted": self.predicted,
            # The planner's prediction is checked against these: the best plan alone, static
            # fleet; latency at the scenario's rate, throughput as capacity (pipeline full).
            "simulated_static": self.static,
            "error": self.error,
        }


def qoe_met(scenario: Scenario, sim: SimResult) -> bool:
    """The scenario's QoE, judged on the simulation."""
    if not sim.feasible or sim.completed == 0:
        return False
    qoe = scenario.qoe
    if qoe.latency_ms is not None and sim.qoe_violation_rate > MAX_VIOLATION_RATE:
        return False
    if sim.lost > 0 and sim.lost / max(sim.completed + sim.lost, 1) > MAX_VIOLATION_RATE:
        return False
    if qoe.min_throughput_sps is not None and sim.throughput_sps < qoe.min_throughput_sps * 0.999:
        return False
    return not (
        qoe.energy_j_per_sample is not None
        and sim.energy_j_per_sample > qoe.energy_j_per_sample * 1.001
    )


def _sim(plan_set: PlanSet, scenario: Scenario, *, dynamics: bool) -> SimResult:
    return simulate(
        list(plan_set.plans),
        scenario,
        mix=dict(plan_set.mix) or None,
        seed=0,
        apply_dynamics=dynamics,
        arrivals=ARRIVALS,
    )


def _static_figures(plan: Plan, scenario: Scenario) -> dict[str, float | None]:
    """What the planner's prediction for ``plan`` is checked against, on the static fleet.

    Latency at the scenario's request rate; throughput as capacity, with the pipeline kept
    full (a predicted capacity is not comparable to the offered rate an open-loop run serves).
    """
    static = simulate([plan], scenario, seed=0, apply_dynamics=False, arrivals=ARRIVALS)
    full = replace(scenario, workload=replace(scenario.workload, rate_rps=0.0), dynamics=())
    capacity = simulate([plan], full, seed=0, apply_dynamics=False)
    figures = _figures(static)
    figures["throughput_sps"] = capacity.throughput_sps
    return figures


def _finite(value: float) -> float | None:
    """JSON has no infinity: an infeasible run's latency and energy become null."""
    return value if math.isfinite(value) else None


def _figures(sim: SimResult) -> dict[str, float | None]:
    return {
        "latency_ms": _finite(sim.latency_ms),
        "latency_ms_p95": _finite(sim.latency_ms_p95),
        "throughput_sps": sim.throughput_sps,
        "energy_j_per_sample": _finite(sim.energy_j_per_sample),
    }


def run_one(scenario: Scenario, planner: str, *, time_limit_s: float | None = None) -> Record:
    start = time.perf_counter()
    try:
        plan_set = api.plan(
            scenario.devices,
            scenario.model,
            scenario.network,
            scenario.workload,
            scenario.qoe,
            planner=planner,
            time_limit_s=time_limit_s,
        )
    except DoraMeshError as err:
        return Record(
            scenario.name,
            planner,
            scenario.qoe.objective,
            False,
            False,
            None,
            None,
            None,
            None,
            None,
            time.perf_counter() - start,
            None,
            None,
            None,
            err.message,
        )
    seconds = time.perf_counter() - start
    sim = _sim(plan_set, scenario, dynamics=True)
    best = plan_set.plans[0]
    static = _static_figures(best, scenario)
    return Record(
        scenario=scenario.name,
        planner=planner,
        objective=scenario.qoe.objective,
        feasible=sim.feasible,
        qoe_met=qoe_met(scenario, sim),
        latency_ms=_finite(sim.latency_ms),
        latency_ms_p95=_finite(sim.latency_ms_p95),
        throughput_sps=sim.throughput_sps,
        energy_j_per_sample=_finite(sim.energy_j_per_sample),
        qoe_violation_rate=sim.qoe_violation_rate,
        plan_seconds=seconds,
        plan=convert.plan_set_to_json(plan_set),
        predicted={
            "latency_ms": best.predicted.latency_ms,
            "throughput_sps": best.predicted.throughput_sps,
            "energy_j_per_sample": best.predicted.energy_j_per_sample,
        },
        static=static,
        error="" if sim.feasible else sim.reason,
    )


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return abs(a - b) / abs(b)


def summarise(records: Sequence[Record]) -> dict[str, Any]:
    """The issue's checks, computed from the records."""
    by: dict[str, dict[str, Record]] = {}
    for r in records:
        by.setdefault(r.scenario, {})[r.planner] = r
    qoe_everywhere = []
    energy_ratios = []
    latency_ok = []
    errors: dict[str, dict[str, float | None]] = {}
    for name, runs in sorted(by.items()):
        ours = runs.get("doramesh")
        if ours is None:
            continue
        anyone = any(r.qoe_met for r in runs.values())
        qoe_everywhere.append(
            {"scenario": name, "any_planner_meets_qoe": anyone, "doramesh_meets_qoe": ours.qoe_met}
        )
        tput = runs.get("throughput-optimal")
        if (
            ours.objective == "min_energy"
            and ours.qoe_met
            and tput is not None
            and tput.energy_j_per_sample
        ):
            assert ours.energy_j_per_sample is not None
            energy_ratios.append(ours.energy_j_per_sample / tput.energy_j_per_sample)
        if ours.objective == "min_latency" and ours.latency_ms is not None:
            baselines = [
                r.latency_ms
                for p, r in runs.items()
                if p != "doramesh" and r.feasible and r.latency_ms is not None
            ]
            best = min(baselines) if baselines else None
            latency_ok.append(
                {
                    "scenario": name,
                    "doramesh_ms": ours.latency_ms,
                    "best_baseline_ms": best,
                    "ok": best is None or ours.latency_ms <= best * 1.0001,
                }
            )
        if ours.predicted and ours.static:
            errors[name] = {
                "latency": _rel(ours.predicted["latency_ms"], ours.static["latency_ms"]),
                "throughput": _rel(ours.predicted["throughput_sps"], ours.static["throughput_sps"]),
            }
    lat_err = [e["latency"] for e in errors.values() if e["latency"] is not None]
    tput_err = [e["throughput"] for e in errors.values() if e["throughput"] is not None]
    return {
        "qoe_met_wherever_any_planner_does": all(
            q["doramesh_meets_qoe"] or not q["any_planner_meets_qoe"] for q in qoe_everywhere
        ),
        "qoe": qoe_everywhere,
        "min_energy_ratio_vs_throughput_optimal_median": (
            statistics.median(energy_ratios) if energy_ratios else None
        ),
        "min_energy_ratios": energy_ratios,
        "min_latency": latency_ok,
        "prediction_error": errors,
        "prediction_error_median": {
            "latency": statistics.median(lat_err) if lat_err else None,
            "throughput": statistics.median(tput_err) if tput_err else None,
        },
    }


def run_planner_bench(
    scenarios_path: str | Path,
    *,
    planners: Sequence[str] = PLANNERS,
    time_limit_s: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    scenarios = load_scenarios(scenarios_path)
    # The planner daemon imports the solver stack when it starts; so does the bench, so that
    # every scenario is planned as the daemon plans it (the partitioner included), and no
    # planner's time includes the import.
    import_s = api.warm_up()
    records: list[Record] = []
    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("planning and simulating", total=len(scenarios) * len(planners))
            for scenario in scenarios:
                for planner in planners:
                    bar.update(task, description=f"{scenario.name} / {planner}")
                    records.append(run_one(scenario, planner, time_limit_s=time_limit_s))
                    bar.advance(task)
    else:
        records = [run_one(s, p, time_limit_s=time_limit_s) for s in scenarios for p in planners]
    return {
        "records": [r.to_json() for r in records],
        "summary": summarise(records),
        "solver_import_s": import_s,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    """A markdown table (for the terminal and the README)."""
    lines = [
        "| scenario | objective | planner | QoE met | latency ms (p50) | throughput sps "
        "| energy J/sample | plan s |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["records"]:
        lines.append(
            f"| {r['scenario']} | {r['objective']} | {r['planner']} | "
            f"{'yes' if r['qoe_met'] else ('no' if r['feasible'] else 'infeasible')} | "
            f"{_fmt(r['latency_ms'])} | {_fmt(r['throughput_sps'], 2)} | "
            f"{_fmt(r['energy_j_per_sample'], 3)} | {_fmt(r['plan_seconds'], 2)} |"
        )
    s = result["summary"]
    med = s["prediction_error_median"]
    ratio = s["min_energy_ratio_vs_throughput_optimal_median"]
    lines += [
        "",
        f"- doramesh meets QoE wherever any planner does: {s['qoe_met_wherever_any_planner_does']}",
        f"- min_energy: doramesh / throughput-optimal energy per sample, median: {_fmt(ratio, 3)}",
        "- min_latency: doramesh no worse than the best baseline: "
        f"{all(x['ok'] for x in s['min_latency'])} ({len(s['min_latency'])} scenarios)",
        f"- prediction vs simulation, median relative error: latency {_fmt(med['latency'], 3)}, "
        f"throughput {_fmt(med['throughput'], 3)}",
    ]
    return "\n".join(lines)


def main(
    scenarios: str,
    json_out: str | None,
    planners: Sequence[str] | None = None,
    markdown_out: str | None = None,
) -> int:
    result = run_planner_bench(scenarios, planners=planners or PLANNERS)
    if markdown_out:
        Path(markdown_out).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_out).write_text(
            f"Produced by `doramesh bench planner --scenarios {scenarios}`; every figure is the "
            "simulator's, not the planner's own prediction.\n\n" + render(result) + "\n"
        )
    from rich.console import Console
    from rich.markdown import Markdown

    Console(width=max(Console().width, 150)).print(Markdown(render(result)))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
    return 0
