"""``doramesh bench planning-time``: how long the doramesh planner takes on big synthetic fleets.

Two sizes, as the planner's issue asks: 16 devices x 96 layers and 64 devices x 200 layers.
Fleets are drawn from the device catalogue (each device a catalogue class at 0.75x, 1x or 1.25x
its speed, as differently clocked or loaded units of one model would be), models are synthetic
layer tables (transformer-like blocks with a few wide activations), and every run plans one
objective for one workload under the size's configured time limit. Seeds alternate between a
shared medium (Wi-Fi) and per-pair links (wired boxes at 940 Mbit/s, Wi-Fi ones at 120).

The solver stack is imported before timing (``api.warm_up``, reported separately): a planner
daemon pays that once at start, not per plan. A run counts as over the limit when its wall time
(the call, measured here) is past the bare limit: no slack. The box's load average is reported
with the figures, since on a shared box it moves them. Every figure comes from running this
module.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from doramesh.errors import DoraMeshError
from doramesh.planner import api
from doramesh.types import (
    DeviceProfile,
    LayerInfo,
    LayerTable,
    Link,
    Network,
    NodeId,
    Objective,
    QoESpec,
    Workload,
)

MB = 1_000_000
OBJECTIVES: tuple[Objective, ...] = ("min_latency", "max_throughput", "min_energy")


@dataclass(frozen=True, slots=True)
class Size:
    devices: int
    layers: int
    time_limit_s: float
    #: The issue's target for the median planning time.
    median_target_s: float


SIZES: tuple[Size, ...] = (Size(16, 96, 1.0, 1.0), Size(64, 200, 10.0, 10.0))
SEEDS: tuple[int, ...] = (0, 1)
WORKLOADS: tuple[Workload, ...] = (
    Workload("inference", batch=1, rate_rps=2.0),
    Workload("inference", batch=8, rate_rps=0.0),
    Workload("training", batch=16, rate_rps=0.0),
)
#: Catalogue classes on wired Ethernet; the others are on Wi-Fi (per-pair link networks).
WIRED = {"mini-pc", "raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano"}


def synthetic_fleet(rng: random.Random, count: int) -> list[DeviceProfile]:
    from doramesh.agent.catalogue import CATALOGUE

    classes = sorted(CATALOGUE.values(), key=lambda c: c.name)
    fleet = []
    for k in range(count):
        c = rng.choice(classes)
        factor = rng.choice((0.75, 1.0, 1.25))
        fleet.append(
            DeviceProfile(
                node_id=NodeId(f"{c.name}-{k}"),
                device_class=c.name,
                gflops=c.gflops * factor,
                memory_bytes=c.usable_memory_bytes,
                cores=c.cores,
                power_idle_w=c.power_idle_w,
                power_active_w=c.power_active_w,
                power_tx_w=c.power_tx_w,
                battery_wh=c.battery_wh or 0.0,
                power_modes=c.power_modes,  # min_energy searches them too
            )
        )
    return fleet


def synthetic_model(rng: random.Random, count: int) -> LayerTable:
    """Transformer-like blocks (similar FLOPs and weights), every few a wide activation."""
    layers = []
    for i in range(count):
        wide = i % 6 == 5
        layers.append(
            LayerInfo(
                name=f"block{i}",
                gflops=rng.uniform(0.4, 1.6),
                param_bytes=int(rng.uniform(15, 45) * MB),
                activation_bytes=int((1.6 if wide else rng.choice((0.2, 0.4))) * MB),
                workspace_bytes=int(rng.uniform(0, 4) * MB),
            )
        )
    return LayerTable(f"synthetic-{count}", tuple(layers), input_bytes=200_000)


def synthetic_network(seed: int, fleet: Sequence[DeviceProfile]) -> Network:
    if seed % 2 == 0:
        return Network("shared", bandwidth_mbps=200.0, latency_ms=3.0)
    links = []
    for i, a in enumerate(fleet):
        for b in fleet[i + 1 :]:
            wired = a.device_class in WIRED and b.device_class in WIRED
            links.append(
                Link(a.node_id, b.node_id, 940.0 if wired else 120.0, 0.3 if wired else 3.0)
            )
    return Network("links", links=tuple(links))


def run_planning_time_bench(
    json_out: str | None = None,
    *,
    sizes: Sequence[Size] = SIZES,
    seeds: Sequence[int] = SEEDS,
    workloads: Sequence[Workload] = WORKLOADS,
    objectives: Sequence[Objective] = OBJECTIVES,
    console: Console | None = None,
) -> dict[str, Any]:
    """Plan every (size, seed, workload, objective) once; report times per size."""
    # Wide enough for the table when the output is a file or a pipe (rich assumes 80 columns).
    console = console or Console(width=max(Console().width, 120))
    import_s = api.warm_up()
    load_before = os.getloadavg()[0]
    records: list[dict[str, Any]] = []
    for size in sizes:
        for seed in seeds:
            rng = random.Random(f"{size.devices}x{size.layers}-{seed}")
            fleet = synthetic_fleet(rng, size.devices)
            model = synthetic_model(rng, size.layers)
            network = synthetic_network(seed, fleet)
            for workload in workloads:
                for objective in objectives:
                    records.append(_run_one(size, seed, fleet, model, network, workload, objective))
    summary = _summarise(records, sizes)
    load = (load_before, os.getloadavg()[0])
    result = {
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min": {"start": load[0], "end": load[1]},
        },
        "solver_import_s": import_s,
        "sizes": summary,
        "runs": records,
    }
    _print(console, summary, import_s, load)
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


def _run_one(
    size: Size,
    seed: int,
    fleet: Sequence[DeviceProfile],
    model: LayerTable,
    network: Network,
    workload: Workload,
    objective: Objective,
) -> dict[str, Any]:
    start = time.perf_counter()
    error = ""
    report: api.PlanningReport | None = None
    try:
        report = api.plan_detailed(
            fleet, model, network, workload, QoESpec(objective), time_limit_s=size.time_limit_s
        )
    except DoraMeshError as err:
        error = err.message
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {
        "size": f"{size.devices}x{size.layers}",
        "seed": seed,
        "network": network.kind,
        "workload": f"{workload.kind}/b{workload.batch}",
        "objective": objective,
        "seconds": seconds,
        "time_limit_s": size.time_limit_s,
        "exceeded": seconds > size.time_limit_s,
        "error": error,
    }
    if report is not None:
        first = report.plan_set.plans[0]
        record.update(
            plans=len(report.plan_set.plans),
            method=report.methods.get(first.plan_id, ""),
            milp_status=report.milp_status,
            milp_gap=report.milp_gap,
            stages=len(first.stages),
            devices=len(set(first.device_ids)),
            predicted={
                "latency_ms": first.predicted.latency_ms,
                "throughput_sps": first.predicted.throughput_sps,
                "energy_j_per_sample": first.predicted.energy_j_per_sample,
            },
        )
    return record


def _summarise(records: Sequence[dict[str, Any]], sizes: Sequence[Size]) -> list[dict[str, Any]]:
    out = []
    for size in sizes:
        name = f"{size.devices}x{size.layers}"
        runs = [r for r in records if r["size"] == name]
        if not runs:
            continue
        times = sorted(r["seconds"] for r in runs)
        gaps = [r["milp_gap"] for r in runs if r.get("milp_gap") is not None]
        out.append(
            {
                "size": name,
                "runs": len(runs),
                "time_limit_s": size.time_limit_s,
                "median_s": statistics.median(times),
                "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))],
                "max_s": times[-1],
                "median_target_s": size.median_target_s,
                "median_ok": statistics.median(times) <= size.median_target_s,
                "limit_exceeded": sum(1 for r in runs if r["exceeded"]),
                "errors": sum(1 for r in runs if r["error"]),
                "milp_proven_optimal": sum(1 for r in runs if r.get("milp_status") == "kOptimal"),
                "milp_median_gap": statistics.median(gaps) if gaps else None,
                "improved_by_milp": sum(
                    1 for r in runs if str(r.get("method", "")).startswith("milp")
                ),
                "milp_statuses": dict(Counter(str(r.get("milp_status")) for r in runs)),
            }
        )
    return out


def _print(
    console: Console,
    summary: Sequence[dict[str, Any]],
    import_s: float,
    load: tuple[float, float],
) -> None:
    table = Table(title="doramesh planning time")
    for column in (
        "devices x layers",
        "runs",
        "limit s",
        "median s",
        "p90 s",
        "max s",
        "over limit",
        "MILP optimal",
        "MILP gap",
        "MILP best",
        "errors",
    ):
        table.add_column(column, justify="right")
    for s in summary:
        gap = s["milp_median_gap"]
        table.add_row(
            s["size"],
            str(s["runs"]),
            f"{s['time_limit_s']:g}",
            f"{s['median_s']:.3f}",
            f"{s['p90_s']:.3f}",
            f"{s['max_s']:.3f}",
            str(s["limit_exceeded"]),
            str(s["milp_proven_optimal"]),
            "-" if gap is None else f"{gap:.2%}",
            str(s["improved_by_milp"]),
            str(s["errors"]),
        )
    console.print(table)
    console.print(
        "MILP optimal: runs whose first plan's program HiGHS proved optimal; MILP gap: median "
        "relative gap where HiGHS reported one; MILP best: runs whose first plan the program found."
    )
    for s in summary:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(s["milp_statuses"].items()))
        console.print(f"{s['size']}: partitioner status per run: {statuses}")
    console.print(
        "(None: not started, nothing to add over the DP or too little time left; no-time: its "
        "estimated compile and a minimal solve did not fit; abandoned: its compile overran "
        "and was left behind; k*: HiGHS' status)"
    )
    console.print(f"solver stack import (once per process, not timed above): {import_s:.2f} s")
    console.print(
        f"load average (1 min) at start and end: {load[0]:.1f}, {load[1]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )


def main(json_out: str | None = None) -> None:
    run_planning_time_bench(json_out)


__all__ = ["SIZES", "Size", "main", "run_planning_time_bench"]
