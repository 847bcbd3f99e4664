"""``doramesh bench fleet``: scenarios run for real on the namespace testbed (root only).

Two measurements:

* ``--link-goodput``: two hosts, stage 0 of resnet18 on one and the rest on the other, the first
  host's egress shaped by ``tbf``; a stream of requests through the coordinator keeps the link
  full and the bench reports the activation bytes delivered per second against the link's rate.
  Every byte goes through the product's path (coordinator -> agent -> PeerLink -> agent).
* ``--scenario FILE [--planner NAME ...]``: each planner plans the scenario; its best plan is
  deployed as given on a testbed with one host per scenario device and the scenario's network,
  then run at the scenario's request rate (latency, energy) and flat out (throughput). The
  record puts the measured figures next to the planner's prediction and the simulator's figure.

**Time dilation.** Two shared CPU cores cannot compute at the speed of a Jetson fleet, and a
paced agent can only slow down. So the testbed runs the scenario ``k`` times slower: every agent
is slowed ``k``x (its pacing fault hook), every link shaped to ``1/k`` of its rate, requests
sent at ``1/k`` of the rate; measured times are divided by ``k`` (throughputs multiplied). Both
the cost model and the simulator are linear in these, so the dilated run measures the same
scenario; what does not scale (per-hop gRPC and Python overheads, the host's own compute when
it exceeds the paced time) is what the measurement exists to catch, shrunk ``k``x for the
first. ``k`` is chosen so the host has room (``--dilation`` overrides) and is in every record.

The room is what this box has *now*: the GFLOP/s an agent thread gets here were measured with
the two cores to ourselves, and other work on the box (the load average above the core count)
takes its share of them, so ``k`` grows with it. Without this an agent that cannot keep to its
paced time runs late and its lateness is reported as the plan's: gpt2-medium's laptop stage
measured 4.5x its prediction at a load average of 9 with ``k`` chosen for an idle box. An
agent whose slowdown would come out below :data:`MIN_SLOWDOWN` (no headroom for the host's own
jitter) fails the scenario with a message naming ``--dilation`` instead of measuring it.

**Power modes.** A plan may run a device in a lower power mode (``DeviceShare.mode``), priced
at the mode's speed and active power. The agent switches to it when the plan's stage loads
(``LoadStageRequest.power_mode``; an emulating agent paces to the mode's speed, on top of the
dilation's slowdown), and the bench prices its busy time at the mode's active power: e.g.
smart-home-assistant's plan runs gpt2-medium on the laptop in its 60% mode (212.7 ms predicted,
127.6 ms at the top mode).

Not emulated: the scenario's per-hop latency (this kernel has no netem; a few ms against
compute of tens to hundreds of ms) and the coordinator's own links, both ways: the scenario's
input starts at the first stage's device and its output ends at the last stage's. The shared
medium exempts the coordinator's traffic in both directions; it used to shape the results
coming back, and gpt2-medium's 6.4 MB of logits per prompt then took 22 s of a medium dilated
to 2.3 Mbit/s, against 9 s of paced compute (the planner prices no such transfer).

A scenario that fails (an agent with no headroom, a deadline) is recorded with its error and
the bench goes on to the next one.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doramesh.types import Plan

#: Requests per planner at the scenario's rate (after the warm-up) and flat out.
RATE_REQUESTS = 30
CAPACITY_REQUESTS = 24
WARMUP_REQUESTS = 4
#: The at-rate phase lasts at most this long (dilated seconds), with at least 8 requests.
RATE_SECONDS = 40.0
#: Effective GFLOP/s of one agent thread on this host that the dilation plans for: well below
#: what a core does alone (about 80), because the box's two cores are shared.
HOST_GFLOPS_PER_AGENT = 15.0
#: The same for the whole box, over all agents at once.
HOST_GFLOPS_TOTAL = 15.0
MAX_VIOLATION_RATE = 0.05
#: An agent slowed less than this has too little headroom over the host's own compute time.
MIN_SLOWDOWN = 1.5


# -- shaped-link goodput ----------------------------------------------------------------------


def link_goodput(rate_mbps: float = 40.0, requests: int = 40, warmup: int = 8) -> dict[str, Any]:
    """Activation goodput over one tbf-shaped link, on the real agent stream path."""
    import torch

    from doramesh import models
    from doramesh.sdk import Client
    from doramesh.testing.testbed import HostSpec, Testbed
    from doramesh.types import DeviceShare, NodeId, PlanId, Prediction, StagePlan

    hosts = [HostSpec("sender", "jetson-orin-nano"), HostSpec("receiver", "jetson-orin-nano")]
    plan = Plan(
        PlanId("link-goodput"),
        (
            StagePlan(0, 0, (DeviceShare(NodeId("sender"), 1.0),)),
            StagePlan(1, 9, (DeviceShare(NodeId("receiver"), 1.0),)),
        ),
        1,
        (),
        Prediction(0.0, 0.0, 0.0),
    )
    with Testbed(hosts) as tb:
        assert tb.lan is not None
        tb.lan.shape_host("h0", rate_mbps)
        inputs = [models.example_input("resnet18", 1, seed=i) for i in range(requests)]
        with torch.inference_mode():
            act_bytes = models.build_blocks("resnet18", 0)[0](inputs[0]).numel() * 4
        done: list[float] = []
        with Client(tb.coordinator_address, timeout=300) as client:
            client.deploy("resnet18", seed=0, plan=plan)
            client.infer("resnet18", inputs[0])  # connections up, stages warm
            tx0 = tb.tx_bytes("sender")
            for _ in client.infer_many("resnet18", inputs):
                done.append(time.perf_counter())
            tx1 = tb.tx_bytes("sender")
    window = done[-1] - done[warmup - 1]
    goodput_mbps = (requests - warmup) * act_bytes * 8 / window / 1e6
    return {
        "link_rate_mbps": rate_mbps,
        "shaping": "tbf on the sending host's eth0",
        "activation_bytes_per_request": act_bytes,
        "requests_measured": requests - warmup,
        "seconds": window,
        "goodput_mbps": goodput_mbps,
        "goodput_ratio": goodput_mbps / rate_mbps,
        "wire_bytes_per_activation_byte": (tx1 - tx0) / (requests * act_bytes),
    }


# -- scenarios on the testbed ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    throughput_sps: float | None
    energy_j_per_sample: float | None

    def to_json(self) -> dict[str, float | None]:
        return {
            "latency_ms_p50": self.latency_ms_p50,
            "latency_ms_p95": self.latency_ms_p95,
            "throughput_sps": self.throughput_sps,
            "energy_j_per_sample": self.energy_j_per_sample,
        }


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def host_share() -> float:
    """The share of this box's cores that other work leaves us: 1 while the load average is
    within the core count, ``cores / load`` above it."""
    cores = os.cpu_count() or 1
    return min(1.0, cores / max(os.getloadavg()[0], 1e-9))


def choose_dilation(scenario: Any, plans: Sequence[Plan], share: float = 1.0) -> float:
    """The smallest whole ``k`` that keeps every agent's paced time above this host's own
    compute time and the box's total load within its shared cores, given the ``share`` of
    the cores that other work leaves (:func:`host_share`)."""
    gflops = {d.node_id: d.gflops for d in scenario.devices}
    per_sample = sum(layer.gflops for layer in scenario.model.layers)
    fastest = max((gflops[d] for p in plans for d in p.device_ids), default=1.0)
    # the capacity phase runs flat out: the load is the plans' throughput, not only the rate
    fastest_rate = max((p.predicted.throughput_sps for p in plans), default=1.0)
    load = per_sample * max(scenario.workload.rate_rps, fastest_rate, 1.0)
    per_agent, total = HOST_GFLOPS_PER_AGENT * share, HOST_GFLOPS_TOTAL * share
    return float(max(1, math.ceil(max(fastest / per_agent, load / total))))


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _at_rate(address: str, model: str, inputs: list[Any], rate: float) -> list[float]:
    """Open loop, evenly spaced arrivals at ``rate``: each request's fleet latency (ms), as the
    coordinator measured it (the client's own hop is not part of any scenario)."""
    from doramesh.sdk import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        start = time.perf_counter()

        async def one(i: int, x: Any) -> float:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            return (await client.infer_result(model, x)).latency_ms

        return list(await asyncio.gather(*(one(i, x) for i, x in enumerate(inputs))))


def _busy_seconds(tb: Any, node_ids: Sequence[str]) -> dict[str, float]:
    from doramesh.channels import create_sync_channel
    from doramesh.v1 import agent_pb2, agent_pb2_grpc

    busy = {}
    for node_id in node_ids:
        with create_sync_channel(tb.agent_address(node_id)) as channel:
            stats = agent_pb2_grpc.AgentStub(channel).GetStats(
                agent_pb2.GetStatsRequest(), timeout=10
            )
        busy[node_id] = sum(s.compute_s for s in stats.stages)
    return busy


def _link_rate_for(scenario: Any, node_id: str) -> float:
    """The rate a device's sends leave at (the medium, or its fastest link), Mbit/s."""
    net = scenario.network
    if net.kind == "shared":
        return float(net.bandwidth_mbps)
    rates = [lk.bandwidth_mbps for lk in net.links if node_id in (lk.a, lk.b)]
    return float(max(rates)) if rates else float(net.bandwidth_mbps)


def dilate(tb: Any, scenario: Any, k: float) -> dict[str, float]:
    """Slow every agent so it computes at 1/k of its scenario device's speed.

    An emulating agent on a host slower than its device reports (and paces to) the host's
    speed, so its slowdown is ``k`` times its reported speed over the device's.
    """
    from doramesh.sdk import Client

    with Client(tb.coordinator_address, timeout=10) as client:
        reported = {a.profile.node_id: a.profile.gflops for a in client.fleet()}
    slowdowns = {d.node_id: k * reported[d.node_id] / d.gflops for d in scenario.devices}
    short = {n: round(x, 2) for n, x in slowdowns.items() if x < MIN_SLOWDOWN}
    if short:
        raise RuntimeError(
            f"{scenario.name}: at k={k:g} agents {short} would be slowed less than "
            f"{MIN_SLOWDOWN}x: this host is too slow or too busy for them; give a larger "
            "--dilation"
        )
    for node_id, slowdown in slowdowns.items():
        tb.slow(node_id, slowdown)
    return slowdowns


def plan_modes(plan: Plan) -> dict[str, str]:
    """The power mode each device of ``plan`` runs in ("" = its top mode)."""
    return {d.id: d.mode for stage in plan.stages for d in stage.devices}


def run_planner_on_testbed(
    tb: Any, scenario: Any, planner: str, plan: Plan, k: float
) -> tuple[Figures, dict[str, Any]]:
    """Deploy ``plan`` as given and measure it; figures in the scenario's (undilated) units.

    A device the plan runs in a lower power mode switches to it when its stage loads (the
    emulating agent paces to the mode's speed, on top of the dilation's slowdown), and its
    energy is priced at the mode's active power, as the planner priced it.
    """
    modes = plan_modes(plan)
    profiles = {d.node_id: d.in_mode(modes.get(d.node_id, "")) for d in scenario.devices}
    return _measure(tb, scenario, plan, k, profiles)


def _measure(
    tb: Any, scenario: Any, plan: Plan, k: float, profiles: dict[str, Any]
) -> tuple[Figures, dict[str, Any]]:
    from doramesh import models
    from doramesh.sdk import Client

    model = scenario.zoo_model
    shape = scenario.zoo_sample_shape
    batch = scenario.workload.batch
    used = sorted(plan.device_ids)
    rate = scenario.workload.rate_rps / k
    # at most RATE_SECONDS of (dilated) time at the scenario's rate, and at least 8 requests
    at_rate = max(8, min(RATE_REQUESTS, int(RATE_SECONDS * rate)))
    # flat out for at most about 40 (dilated) seconds, at least 8 requests
    flat_out = max(8, min(CAPACITY_REQUESTS, int(40.0 * plan.predicted.throughput_sps / k)))
    n = WARMUP_REQUESTS + max(at_rate, flat_out)
    inputs = [models.example_input(model, batch, seed=i, sample_shape=shape) for i in range(n)]
    with Client(tb.coordinator_address, timeout=600) as client:
        client.deploy(model, seed=0, plan=plan, timeout=600)
        for x in inputs[:WARMUP_REQUESTS]:
            client.infer(model, x)
    busy0 = _busy_seconds(tb, used)
    tx0 = {d: tb.tx_bytes(d) for d in used}
    t0 = time.perf_counter()
    latencies = asyncio.run(
        _at_rate(
            tb.coordinator_address, model, inputs[WARMUP_REQUESTS : WARMUP_REQUESTS + at_rate], rate
        )
    )
    wall = time.perf_counter() - t0
    busy1 = _busy_seconds(tb, used)
    tx1 = {d: tb.tx_bytes(d) for d in used}
    # flat out: the pipeline kept full, completions per second after the first few
    done: list[float] = []
    cap_inputs = inputs[:flat_out]
    with Client(tb.coordinator_address, timeout=600) as client:
        for _ in client.infer_many(model, cap_inputs):
            done.append(time.perf_counter())
    skip = min(4, len(done) - 2)
    capacity = (len(done) - 1 - skip) * batch / (done[-1] - done[skip]) * k
    energy = 0.0
    detail: dict[str, Any] = {}
    samples = at_rate * batch
    for d in used:
        p = profiles[d]
        busy = (busy1[d] - busy0[d]) / k
        tx_s = (tx1[d] - tx0[d]) * 8 / (_link_rate_for(scenario, d) * 1e6 / k) / k
        idle = max(0.0, wall / k - busy)
        energy += p.power_active_w * busy + p.power_idle_w * idle + p.power_tx_w * tx_s
        detail[d] = {"busy_s": busy, "tx_s": tx_s, "tx_bytes": tx1[d] - tx0[d]}
    lat = [x / k for x in latencies]
    figures = Figures(
        latency_ms_p50=statistics.median(lat),
        latency_ms_p95=_percentile(lat, 0.95),
        throughput_sps=capacity,
        energy_j_per_sample=energy / samples,
    )
    slo = scenario.qoe.latency_ms
    violations = sum(1 for x in lat if slo is not None and x > slo) / len(lat)
    detail_out = {
        "devices": detail,
        "wall_s": wall / k,
        "offered_rps": scenario.workload.rate_rps,
        "requests_at_rate": at_rate,
        "requests_flat_out": len(cap_inputs),
        "latency_violation_rate": violations,
        "power_modes": {d: m for d, m in plan_modes(plan).items() if m},
    }
    return figures, detail_out


def measured_qoe_met(scenario: Any, f: Figures, violation_rate: float) -> bool:
    q = scenario.qoe
    if q.latency_ms is not None and violation_rate > MAX_VIOLATION_RATE:
        return False
    if q.min_throughput_sps is not None and (f.throughput_sps or 0.0) < q.min_throughput_sps:
        return False
    return not (
        q.energy_j_per_sample is not None
        and (f.energy_j_per_sample or math.inf) > q.energy_j_per_sample
    )


def run_scenario(
    path: str,
    planners: Sequence[str],
    dilation: float | None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run each planner's plan of the scenario on one testbed; one record per planner.

    A planner whose run fails (a deadline, an agent with no headroom) is recorded with its
    error and the next planner still runs; ``on_record`` sees each record as it is made, so a
    long run that is cut short keeps what it measured.
    """
    from doramesh.bench.planner import _static_figures
    from doramesh.errors import DoraMeshError
    from doramesh.planner import api
    from doramesh.scenario import load_scenario
    from doramesh.testing.testbed import Testbed

    scenario = load_scenario(path)
    if scenario.zoo_model is None:
        raise SystemExit(
            f"{path}: the testbed runs zoo models (an explicit layer table has no weights)"
        )
    if scenario.workload.kind != "inference":
        raise SystemExit(f"{path}: bench fleet runs inference scenarios")
    plans: dict[str, Plan] = {}
    errors: dict[str, str] = {}
    for name in planners:
        try:
            plan_set = api.plan(
                scenario.devices,
                scenario.model,
                scenario.network,
                scenario.workload,
                scenario.qoe,
                planner=name,
            )
            plans[name] = plan_set.plans[0]
        except DoraMeshError as err:
            errors[name] = err.message
    share = host_share()
    load_average = [round(x, 2) for x in os.getloadavg()]
    k = dilation or choose_dilation(scenario, list(plans.values()), share)
    records: list[dict[str, Any]] = []

    def add(record: dict[str, Any]) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    # A CPU-bound agent on this shared box can miss health checks for seconds; a plan deployed
    # as given must not be dropped and re-planned for that.
    with Testbed.from_scenario(
        scenario, dilation=k, shape_coordinator=False, dead_after_s=60.0
    ) as tb:
        slowdowns = dilate(tb, scenario, k)
        for name in planners:
            if name not in plans:
                add(
                    {
                        "scenario": scenario.name,
                        "planner": name,
                        "feasible": False,
                        "error": errors[name],
                    }
                )
                continue
            plan = plans[name]
            sim = _static_figures(plan, scenario)
            try:
                measured, detail = run_planner_on_testbed(tb, scenario, name, plan, k)
            except Exception as err:  # recorded: the next planner still runs
                print(f"{scenario.name} / {name}: failed: {err!r}")
                add(
                    {
                        "scenario": scenario.name,
                        "planner": name,
                        "feasible": True,
                        "failed": repr(err),
                        "dilation": k,
                        "load_average": load_average,
                        "predicted": _prediction_json(plan),
                        "plan": _plan_json(plan),
                    }
                )
                continue
            add(
                {
                    "scenario": scenario.name,
                    "planner": name,
                    "objective": scenario.qoe.objective,
                    "feasible": True,
                    "dilation": k,
                    "host_share": share,
                    "load_average": load_average,
                    "agent_slowdowns": slowdowns,
                    "measured": measured.to_json(),
                    "predicted": _prediction_json(plan),
                    "simulated": {
                        "latency_ms_p50": sim["latency_ms"],
                        "latency_ms_p95": sim["latency_ms_p95"],
                        "throughput_sps": sim["throughput_sps"],
                        "energy_j_per_sample": sim["energy_j_per_sample"],
                    },
                    "qoe_met": measured_qoe_met(
                        scenario, measured, detail["latency_violation_rate"]
                    ),
                    "plan": _plan_json(plan),
                    "detail": detail,
                }
            )
    return records


def _prediction_json(plan: Plan) -> dict[str, float | None]:
    pred = plan.predicted
    return {
        "latency_ms_p50": pred.latency_ms,
        "latency_ms_p95": None,
        "throughput_sps": pred.throughput_sps,
        "energy_j_per_sample": pred.energy_j_per_sample,
    }


def _plan_json(plan: Plan) -> dict[str, Any]:
    from doramesh import convert

    return convert.plan_to_json(plan)


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return (a - b) / b


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render(records: Sequence[dict[str, Any]]) -> str:
    head = (
        "| scenario | planner | k | latency p50 ms meas / pred / sim | p95 meas / sim | "
        "samples/s meas / pred / sim | J/sample meas / pred / sim | QoE met |"
    )
    rows = [head, "|" + " --- |" * 8]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3g}"

    for r in records:
        if not r.get("feasible"):
            rows.append(
                f"| {r['scenario']} | {r['planner']} | - | infeasible: {r.get('error')} | | | | |"
            )
            continue
        if r.get("failed"):
            rows.append(
                f"| {r['scenario']} | {r['planner']} | {r['dilation']:g} | "
                f"failed: {r['failed']} | | | | |"
            )
            continue
        m, p, s = r["measured"], r["predicted"], r["simulated"]
        rows.append(
            f"| {r['scenario']} | {r['planner']} | {r['dilation']:g} | "
            f"{f(m['latency_ms_p50'])} / {f(p['latency_ms_p50'])} / {f(s['latency_ms_p50'])} | "
            f"{f(m['latency_ms_p95'])} / {f(s['latency_ms_p95'])} | "
            f"{f(m['throughput_sps'])} / {f(p['throughput_sps'])} / {f(s['throughput_sps'])} | "
            f"{f(m['energy_j_per_sample'])} / {f(p['energy_j_per_sample'])} / "
            f"{f(s['energy_j_per_sample'])} | {'yes' if r['qoe_met'] else 'no'} |"
        )
    return "\n".join(rows)


#: Objective -> (figure, better is lower) for "doramesh ahead of throughput-optimal".
_OBJECTIVE_FIGURE = {
    "min_energy": ("energy_j_per_sample", True),
    "min_latency": ("latency_ms_p50", True),
    "max_throughput": ("throughput_sps", False),
}


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario: doramesh's measured-vs-predicted error (latency p50, throughput) and
    whether it is ahead of throughput-optimal on its own QoE objective, both measured."""
    out = []
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["scenario"], {})[r["planner"]] = r
    for name, runs in by.items():
        ours, theirs = runs.get("doramesh"), runs.get("throughput-optimal")
        if ours is None or not ours.get("feasible") or ours.get("failed"):
            continue
        m, p = ours["measured"], ours["predicted"]
        row: dict[str, Any] = {
            "scenario": name,
            "latency_error": _rel(m["latency_ms_p50"], p["latency_ms_p50"]),
            "throughput_error": _rel(m["throughput_sps"], p["throughput_sps"]),
            "qoe_met": ours["qoe_met"],
        }
        key, lower = _OBJECTIVE_FIGURE[ours["objective"]]
        row["objective"], row["doramesh"] = ours["objective"], m[key]
        if theirs is not None and theirs.get("failed"):
            row["throughput_optimal_failed"] = theirs["failed"]
        elif theirs is not None and theirs.get("feasible"):
            a, b = m[key], theirs["measured"][key]
            row["throughput_optimal"] = b
            row["ahead"] = a is not None and b is not None and (a < b if lower else a > b)
        out.append(row)
    return out


def main(
    *,
    scenarios: Sequence[str],
    planners: Sequence[str] | None,
    json_out: str | None,
    link_goodput_rate: float | None,
    dilation: float | None,
) -> int:
    from doramesh.testing.netns import why_unavailable

    reason = why_unavailable()
    if reason is not None:
        print(f"doramesh bench fleet: {reason}")
        return 2
    out: dict[str, Any] = {}
    if link_goodput_rate is not None:
        result = link_goodput(link_goodput_rate)
        out["link_goodput"] = result
        print(
            f"activation goodput on a {result['link_rate_mbps']:g} Mbit/s tbf link: "
            f"{result['goodput_mbps']:.1f} Mbit/s = {100 * result['goodput_ratio']:.1f}% "
            f"of the rate ({result['requests_measured']} x "
            f"{result['activation_bytes_per_request']} B in {result['seconds']:.2f} s)"
        )
    records: list[dict[str, Any]] = []

    def keep(record: dict[str, Any]) -> None:
        records.append(record)
        if json_out:  # after each planner, so a long run that is cut short keeps its records
            Path(json_out).write_text(json.dumps(records, indent=2))

    for path in scenarios:
        try:
            run_scenario(path, planners or ("doramesh", "throughput-optimal"), dilation, keep)
        except Exception as err:  # recorded: the next scenario still runs (SIGTERM still ends all)
            print(f"{path}: failed: {err!r}")
            keep({"scenario": path, "planner": "-", "feasible": False, "error": repr(err)})
        print(render(records))
    if records:
        out["records"] = records
        for row in summarise(records):
            versus = (
                f"throughput-optimal failed: {row['throughput_optimal_failed']}"
                if "throughput_optimal_failed" in row
                else f"{_num(row.get('throughput_optimal'))} (ahead: {row.get('ahead')})"
            )
            print(
                f"{row['scenario']}: doramesh measured vs predicted latency "
                f"{_pct(row['latency_error'])}, throughput {_pct(row['throughput_error'])}; "
                f"QoE met: {row['qoe_met']}; on {row.get('objective')}: doramesh "
                f"{_num(row.get('doramesh'))} vs throughput-optimal {versus}"
            )
    if json_out:
        Path(json_out).write_text(
            json.dumps(records if records and len(out) == 1 else out, indent=2)
        )
    return 0
