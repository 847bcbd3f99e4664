"""``doramesh testbed up|down|run`` and ``doramesh bench fleet`` (root only)."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from typing import Any


def add_testbed_parser(sub: Any) -> None:
    tb = sub.add_parser(
        "testbed",
        help="a real multi-host LAN in network namespaces (root only)",
        description="Start a scenario's fleet in network namespaces: one host per device, a "
        "bridge, the scenario's network shaped with tc, the planner and coordinator started "
        "from compose.yaml's commands, agents emulating the devices, discovery by mDNS.",
    )
    tb_sub = tb.add_subparsers(dest="testbed", required=True, metavar="ACTION")
    up = tb_sub.add_parser("up", help="start a scenario's testbed and leave it running")
    up.add_argument("scenario", help="scenario file (YAML)")
    _add_latency_flags(up)
    down = tb_sub.add_parser("down", help="stop testbeds and remove their namespaces")
    down.add_argument(
        "--prefix", default=None, help="only this run's prefix (default: every testbed)"
    )
    run = tb_sub.add_parser(
        "run", help="up, serve the scenario's workload while applying its dynamics live, down"
    )
    run.add_argument("scenario", help="scenario file (YAML)")
    run.add_argument("--planner", default="doramesh", help="planner the coordinator uses")
    run.add_argument(
        "--seconds", type=float, default=None, help="run time (default: last event + 10 s)"
    )
    run.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply the dynamics' times by this (0.25: four times faster)",
    )
    run.add_argument(
        "--dilation",
        type=float,
        default=1.0,
        help="run k times slower than the scenario (agents slowed, links and rate at 1/k; "
        "figures reported in the scenario's time), for fleets faster than this box",
    )
    run.add_argument("--json", dest="json_out", default=None, metavar="OUT")
    _add_latency_flags(run)


def _latency(value: str) -> float | str:
    return value if value == "scenario" else float(value)


def _scenario_latency(network: Any) -> float:
    """The scenario's one-way hop latency. A host's forwarder delays all it sends alike, so a
    ``links`` network's latencies must agree."""
    if network.kind == "shared":
        return float(network.latency_ms)
    values = {link.latency_ms for link in network.links}
    if len(values) != 1:
        raise SystemExit(f"the links' latencies differ ({sorted(values)}): give --latency-ms MS")
    return float(values.pop())


def _add_latency_flags(parser: Any) -> None:
    parser.add_argument(
        "--latency-ms",
        nargs="?",
        const="scenario",
        type=_latency,
        default=None,
        metavar="MS",
        help="one-way delay each LAN hop adds, by a userspace forwarder per host (no value: "
        "the scenario's network.latency_ms; default: none)",
    )
    parser.add_argument(
        "--jitter-ms", type=float, default=0.0, help="jitter around --latency-ms (uniform)"
    )


def add_bench_fleet_parser(bench_sub: Any) -> None:
    fleet = bench_sub.add_parser(
        "fleet", help="scenarios run for real on the namespace testbed (root only)"
    )
    fleet.add_argument(
        "--scenario", action="append", default=[], help="scenario file; repeat for several"
    )
    fleet.add_argument(
        "--planner",
        action="append",
        default=None,
        help="planner to run; repeat (default: doramesh, throughput-optimal)",
    )
    fleet.add_argument("--json", dest="json_out", default=None, metavar="OUT")
    fleet.add_argument(
        "--link-goodput",
        nargs="?",
        type=float,
        const=20.0,
        default=None,
        metavar="MBPS",
        help="measure activation goodput over one tbf-shaped link (default 20 Mbit/s)",
    )
    fleet.add_argument(
        "--dilation",
        type=float,
        default=None,
        help="time dilation k (default: chosen per scenario)",
    )
    fleet.add_argument(
        "--contention",
        action="store_true",
        help="a latency-critical and a bulk plan on one shared medium, measured paced and "
        "unpaced in one run (see doramesh.bench.contention)",
    )


def _exit_on_sigterm() -> None:
    """SIGTERM (a CI timeout, ``kill``) exits through ``finally`` and ``atexit``, so the
    testbed's namespaces are removed rather than left behind."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def run_bench_fleet(args: argparse.Namespace) -> int:
    _exit_on_sigterm()
    from doramesh.bench.fleet import main

    if args.contention:
        from doramesh.bench.contention import main as contention

        return contention(json_out=args.json_out, dilation=args.dilation)
    if not args.scenario and args.link_goodput is None:
        print("doramesh bench fleet: give --scenario FILE and/or --link-goodput", file=sys.stderr)
        return 2
    return main(
        scenarios=args.scenario,
        planners=args.planner,
        json_out=args.json_out,
        link_goodput_rate=args.link_goodput,
        dilation=args.dilation,
    )


def run_testbed(args: argparse.Namespace) -> int:
    _exit_on_sigterm()
    from doramesh.testing.netns import BASE_PREFIX, remove_prefix, why_unavailable
    from doramesh.testing.testbed import STATE_DIR

    if args.testbed == "down":
        prefix = args.prefix or BASE_PREFIX
        removed = remove_prefix(prefix)
        for path in STATE_DIR.glob(f"{prefix}*.json") if STATE_DIR.exists() else ():
            path.unlink(missing_ok=True)
        print(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing to remove")
        return 0
    reason = why_unavailable(need_iptables=args.testbed == "run")
    if reason is not None:
        print(f"doramesh testbed: {reason}", file=sys.stderr)
        return 2
    from doramesh.scenario import load_scenario
    from doramesh.testing.testbed import Testbed

    scenario = load_scenario(args.scenario)
    k = getattr(args, "dilation", 1.0)
    latency = (
        _scenario_latency(scenario.network) if args.latency_ms == "scenario" else args.latency_ms
    )
    if latency is None and args.jitter_ms:
        latency = 0.0
    tb = Testbed.from_scenario(
        scenario,
        dilation=k,
        dead_after_s=5.0,
        latency_ms=None if latency is None else latency * k,
        jitter_ms=args.jitter_ms * k,
    )
    if args.testbed == "up":
        tb.up()
        tb.detach()
        path = tb.save_state()
        print(json.dumps(tb.state(), indent=2))
        print(f"state in {path}; `doramesh testbed down --prefix {tb.prefix}` removes it")
        return 0
    with tb:
        report = run_with_dynamics(
            tb, scenario, args.planner, args.seconds, args.time_scale, dilation=k
        )
    print(json.dumps(report, indent=2))
    if args.json_out:
        from pathlib import Path

        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0 if report["failed"] == 0 else 1


def run_with_dynamics(
    tb: Any,
    scenario: Any,
    planner: str,
    seconds: float | None,
    time_scale: float,
    *,
    dilation: float = 1.0,
) -> dict[str, Any]:
    """Serve the scenario's workload at its rate while its dynamics trace is applied live.

    With ``dilation`` k, everything runs k times slower (see ``doramesh.bench.fleet``) and the
    report is in the scenario's own time.
    """
    from doramesh import models
    from doramesh.bench.fleet import dilate
    from doramesh.sdk import AsyncClient, Client

    k = dilation
    base = dilate(tb, scenario, k) if k != 1.0 else {d.node_id: 1.0 for d in scenario.devices}
    time_scale *= k

    model = scenario.zoo_model
    if model is None:
        raise SystemExit("the testbed runs zoo models (an explicit layer table has no weights)")
    events = sorted(scenario.dynamics, key=lambda e: e.at_s)
    duration = (seconds or max((e.at_s for e in events), default=0.0) * time_scale / k + 10.0) * k
    from doramesh.planner import api

    # The plan comes from the scenario's own figures and is deployed as given: an emulating
    # agent on a host slower than its device reports the host's speed, which the coordinator's
    # planner would plan with. Re-plans after the dynamics (a host leaving) are the
    # coordinator's, on what the agents report.
    plan = api.plan(
        scenario.devices,
        scenario.model,
        scenario.network,
        scenario.workload,
        scenario.qoe,
        planner=planner,
    ).plans[0]
    with Client(tb.coordinator_address, timeout=600) as client:
        dep = client.deploy(model, plan=plan, timeout=600)
    applied: list[dict[str, Any]] = []

    factor = {d.node_id: 1.0 for d in scenario.devices}

    def apply(event: Any) -> None:
        if event.bandwidth_mbps is not None:
            tb.set_bandwidth(event.bandwidth_mbps / k)
        if event.device is not None:
            if event.slowdown is not None:
                factor[event.device] = event.slowdown
            if event.leave:
                tb.kill_agent(event.device)
            if event.join:
                tb.start_agent(event.device)
                tb.wait_for_agents([event.device], 120)
            if event.slowdown is not None or event.join:
                tb.slow(event.device, base[event.device] * factor[event.device])

    async def serve() -> dict[str, Any]:
        rate = (scenario.workload.rate_rps or 1.0) / k
        n = max(1, int(duration * rate))
        shape = scenario.zoo_sample_shape
        batch = scenario.workload.batch
        results: list[tuple[float, float, int] | None] = [None] * n
        start = time.perf_counter()

        async def dynamics() -> None:
            for event in events:
                await asyncio.sleep(max(0.0, start + event.at_s * time_scale - time.perf_counter()))
                await asyncio.to_thread(apply, event)
                at = (time.perf_counter() - start) / k
                applied.append({"at_s": round(at, 2), **_event(event)})

        async with AsyncClient(tb.coordinator_address, timeout=120) as client:

            async def one(i: int) -> None:
                await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
                x = models.example_input(model, batch, seed=i, sample_shape=shape)
                try:
                    r = await client.infer_result(model, x)
                except Exception:  # a failed request is counted, not raised
                    return
                results[i] = (i / rate / k, r.latency_ms / k, r.plan_epoch)

            await asyncio.gather(dynamics(), *(one(i) for i in range(n)))
        done = [r for r in results if r is not None]
        lat = [r[1] for r in done]
        return {
            "sent": n,
            "completed": len(done),
            "failed": n - len(done),
            "latency_ms_p50": statistics.median(lat) if lat else None,
            "latency_ms_p95": sorted(lat)[int(0.95 * (len(lat) - 1))] if lat else None,
            "plan_epochs": sorted({r[2] for r in done}),
            "windows": _windows(done, 5.0),
        }

    report = asyncio.run(serve())
    return {
        "scenario": scenario.name,
        "planner": planner,
        "dilation": k,
        "first_plan": [[s.first, s.last, [d.id for d in s.devices]] for s in dep.plan.stages],
        "events": applied,
        **report,
    }


def _event(e: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("bandwidth_mbps", "device", "slowdown"):
        if getattr(e, key) is not None:
            out[key] = getattr(e, key)
    if e.leave:
        out["leave"] = True
    if e.join:
        out["join"] = True
    return out


def _windows(done: list[tuple[float, float, int]], width: float) -> list[dict[str, Any]]:
    """Latency per ``width``-second window of arrival time, to show the dynamics' effect."""
    by: dict[int, list[float]] = {}
    for at, lat, _ in done:
        by.setdefault(int(at // width), []).append(lat)
    return [
        {"from_s": w * width, "requests": len(v), "latency_ms_p50": statistics.median(v)}
        for w, v in sorted(by.items())
    ]
