"""``doramesh plan SCENARIO [--planner NAME] [--json]``: plan a scenario file offline.

The same ``doramesh.planner.api.plan`` the planner service runs, on a scenario file instead of a
live fleet, so a researcher sees exactly the plans a deployment would get: stages and their
devices, microbatch, predicted latency, throughput and energy, and whether each prediction
meets the scenario's QoE bounds. ``cli.py`` wires the subcommand in with ``add_plan_parser``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from doramesh.errors import DoraMeshError, FailedPrecondition
from doramesh.scenario_types import Scenario
from doramesh.types import Plan, PlanSet, QoESpec

#: Relative slack when checking a prediction against a bound, as the planner's own check
#: (``dp.BOUND_SLACK``): a plan exactly at its bound must not read as a miss after rounding.
_BOUND_SLACK = 1e-9


def add_plan_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``plan`` subcommand; its handler is ``run_plan_args``."""
    from doramesh.planner.api import DEFAULT_MAX_PLANS, DEFAULT_PLANNER, MAX_PLANS_LIMIT

    parser = subparsers.add_parser(
        "plan",
        help="plan a scenario file offline",
        description="Load a scenario file (see scenarios/README.md), plan it with the "
        "planner, and print the plan set with its predicted latency, throughput and "
        "energy. Exit status 2 when the scenario is invalid or its QoE cannot be met.",
    )
    parser.add_argument("scenario", metavar="SCENARIO", help="scenario YAML file")
    parser.add_argument(
        "--planner",
        default=DEFAULT_PLANNER,
        help=f"planner to use (default {DEFAULT_PLANNER})",
    )
    parser.add_argument(
        "--max-plans",
        type=int,
        default=DEFAULT_MAX_PLANS,
        help=f"most plans in the set, 1..{MAX_PLANS_LIMIT} (default {DEFAULT_MAX_PLANS})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run_plan_args)


def run_plan_args(args: argparse.Namespace) -> int:
    return run_plan(args.scenario, args.planner, args.json, args.max_plans)


def run_plan(scenario_path: str, planner: str, as_json: bool, max_plans: int = 4) -> int:
    """Plan one scenario file and print the result; 0 on success, 2 on a ``DoraMeshError``
    (invalid file, unknown planner, or a QoE no plan can meet: the planner says which bound
    binds and by how much)."""
    from doramesh.planner import api
    from doramesh.scenario import load_scenario

    try:
        scenario = load_scenario(scenario_path)
        started = time.perf_counter()
        plan_set = api.plan(
            list(scenario.devices),
            scenario.model,
            scenario.network,
            scenario.workload,
            scenario.qoe,
            max_plans=max_plans,
            planner=planner,
        )
        seconds = time.perf_counter() - started
    except FailedPrecondition as err:
        print(
            f"doramesh plan: {scenario_path}: no plan meets the QoE: {err.message}", file=sys.stderr
        )
        return 2
    except DoraMeshError as err:
        print(f"doramesh plan: {err}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(_json_report(scenario, planner, seconds, plan_set), indent=2))
    else:
        _print_table(scenario, planner, seconds, plan_set)
    return 0


def _json_report(
    scenario: Scenario, planner: str, seconds: float, plan_set: PlanSet
) -> dict[str, Any]:
    from doramesh.convert import plan_set_to_json

    return {
        "scenario": scenario.name,
        "planner": planner,
        "plan_seconds": seconds,
        "plan_set": plan_set_to_json(plan_set),
        # Per plan: does its prediction meet every bound (the planner promises it does).
        "qoe_met": {p.plan_id: not qoe_misses(p, scenario.qoe) for p in plan_set.plans},
    }


def qoe_misses(plan: Plan, qoe: QoESpec) -> list[str]:
    """The QoE bounds a plan's prediction misses (empty when it meets them all)."""
    q = plan.predicted
    misses = []
    if qoe.latency_ms is not None and not _within(q.latency_ms, qoe.latency_ms):
        misses.append(f"latency {q.latency_ms:.1f} > {qoe.latency_ms:g} ms")
    if qoe.min_throughput_sps is not None and not _within(qoe.min_throughput_sps, q.throughput_sps):
        misses.append(f"throughput {q.throughput_sps:.3g} < {qoe.min_throughput_sps:g} /s")
    if qoe.energy_j_per_sample is not None and not _within(
        q.energy_j_per_sample, qoe.energy_j_per_sample
    ):
        misses.append(f"energy {q.energy_j_per_sample:.3g} > {qoe.energy_j_per_sample:g} J")
    return misses


def _within(value: float, bound: float) -> bool:
    return math.isfinite(value) and value <= bound * (1 + _BOUND_SLACK)


def _print_table(scenario: Scenario, planner: str, seconds: float, plan_set: PlanSet) -> None:
    from rich.console import Console
    from rich.table import Table

    from doramesh.scenario import scenario_summary

    summary = scenario_summary(scenario)
    console = Console()
    if not console.is_terminal:
        # Piped or captured: no terminal width to respect, and wrapped stage lists are hard
        # to read or grep.
        console = Console(width=160)
    title = f"[bold]{scenario.name}[/bold]"
    console.print(f"{title}: {scenario.description}" if scenario.description else title)
    for key in ("devices", "network", "model", "workload"):
        console.print(f"  {key}: {summary[key]}")
    console.print(f"  QoE: {summary['objective']}, bounds: {summary['bounds']}")
    table = Table(title=f"{len(plan_set.plans)} plan(s) by {planner} in {seconds:.2f} s")
    table.add_column("plan", no_wrap=True)
    table.add_column("mix", justify="right")
    table.add_column("stages: layers -> device (share, power mode)", no_wrap=True)
    for column in ("microbatch", "latency ms", "samples/s", "J/sample"):
        table.add_column(column, justify="right")
    table.add_column("QoE")
    for plan in plan_set.plans:
        stages = "\n".join(
            f"{s.first}-{s.last} -> "
            + ", ".join(
                f"{d.id} ({d.share:.2f}{', ' + d.mode if d.mode else ''})" for d in s.devices
            )
            for s in plan.stages
        )
        misses = qoe_misses(plan, scenario.qoe)
        q = plan.predicted
        table.add_row(
            plan.plan_id,
            f"{plan_set.mix.get(plan.plan_id, 0.0):.2f}",
            stages,
            str(plan.microbatch),
            f"{q.latency_ms:.1f}",
            f"{q.throughput_sps:.3g}",
            f"{q.energy_j_per_sample:.3g}",
            "[green]met[/green]" if not misses else "[red]" + "; ".join(misses) + "[/red]",
        )
    console.print(table)
