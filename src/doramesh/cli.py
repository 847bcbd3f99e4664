"""The ``doramesh`` command: daemons (agent, coordinator, planner), the demo, benchmarks, tools.

Every daemon flag can also be set by an environment variable, named in its ``--help``; flags
win over the environment. Settings are read once here and passed down as one object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

ENV_PREFIX = "DORAMESH_"


class _Daemon(Protocol):
    async def start(self) -> str: ...
    async def stop(self, grace: float = ...) -> None: ...


def _env(name: str, default: Any, kind: Callable[[str], Any] = str) -> Any:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    return kind(raw)


def _env_list(name: str) -> list[str]:
    raw = os.environ.get(ENV_PREFIX + name, "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def _env_bool(name: str) -> bool:
    return os.environ.get(ENV_PREFIX + name, "").lower() in {"1", "true", "yes", "on"}


def _add(parser: argparse.ArgumentParser, flag: str, env: str, help: str, **kwargs: Any) -> None:
    """A flag whose default comes from $DORAMESH_<env>, documented in --help."""
    parser.add_argument(flag, help=f"{help} [env {ENV_PREFIX}{env}]", **kwargs)


def _common_daemon_flags(parser: argparse.ArgumentParser) -> None:
    _add(
        parser,
        "--log-level",
        "LOG_LEVEL",
        "debug, info, warning or error",
        default=_env("LOG_LEVEL", "info"),
    )
    _add(
        parser,
        "--log-json",
        "LOG_JSON",
        "log JSON lines even on a terminal",
        action="store_true",
        default=_env_bool("LOG_JSON"),
    )
    _add(
        parser,
        "--ready-file",
        "READY_FILE",
        'write {"address": host:port} here once serving (for supervisors and tests)',
        type=Path,
        default=_env("READY_FILE", None, Path),
    )
    _add(
        parser,
        "--mdns-interface",
        "MDNS_INTERFACES",
        "IPv4 address of an interface mDNS binds to; repeat for several (default: all). "
        "Comma-separated in the env var",
        action="append",
        default=None,
    )


def _model_import_flag(parser: argparse.ArgumentParser) -> None:
    _add(
        parser,
        "--model-import",
        "MODEL_IMPORTS",
        "serve a user model, 'package.module:factory'; repeat for several (comma-separated "
        "in the env var). The same path must be given to the coordinator and the agents",
        action="append",
        default=None,
    )


def _register_model_imports(args: argparse.Namespace) -> None:
    from doramesh import models

    for path in args.model_import or _env_list("MODEL_IMPORTS"):
        models.resolve(path)


def _mdns_interfaces(args: argparse.Namespace) -> tuple[str, ...] | None:
    items = args.mdns_interface or _env_list("MDNS_INTERFACES")
    return tuple(items) if items else None


def build_parser() -> argparse.ArgumentParser:
    from doramesh.agent.config import DEFAULT_MAX_INFLIGHT_MICROBATCHES
    from doramesh.coordinator.config import DEFAULT_MAX_INFLIGHT_REQUESTS
    from doramesh.fleet_cli import add_fleet_admin, add_security_flags

    parser = argparse.ArgumentParser(
        prog="doramesh",
        description="QoE-aware hybrid parallelism for AI models across a fleet of edge devices.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser(
        "agent",
        help="run the agent daemon on a device",
        description="Run the agent daemon: measure this device, serve stages, "
        "announce itself by mDNS.",
    )
    _add(
        agent,
        "--listen",
        "AGENT_LISTEN",
        "host:port the gRPC server binds",
        default=_env("AGENT_LISTEN", "0.0.0.0:7072"),
    )
    _add(
        agent,
        "--advertise-host",
        "AGENT_ADVERTISE_HOST",
        "host peers dial (default: the listen host, or 127.0.0.1 for a wildcard listen)",
        default=_env("AGENT_ADVERTISE_HOST", ""),
    )
    _add(
        agent,
        "--node-id",
        "NODE_ID",
        "stable id of this device (default: hostname + random)",
        default=_env("NODE_ID", None),
    )
    _add(
        agent, "--fleet-id", "FLEET_ID", "fleet this agent belongs to", default=_env("FLEET_ID", "")
    )
    _add(
        agent,
        "--emulate",
        "EMULATE",
        "catalogue device to emulate: paces compute to its speed, reports its memory and power",
        default=_env("EMULATE", None),
    )
    _add(
        agent,
        "--memory-mb",
        "MEMORY_MB",
        "cap on the memory doramesh may use here, MiB",
        type=int,
        default=_env("MEMORY_MB", None, int),
    )
    _add(
        agent,
        "--no-announce",
        "NO_ANNOUNCE",
        "do not announce by mDNS (static agent lists)",
        action="store_true",
        default=_env_bool("NO_ANNOUNCE"),
    )
    _add(
        agent,
        "--cache-dir",
        "CACHE_DIR",
        "where fetched stage weights are cached",
        type=Path,
        default=_env("CACHE_DIR", Path.home() / ".cache" / "doramesh" / "weights", Path),
    )
    _add(
        agent,
        "--weight-cache-mb",
        "WEIGHT_CACHE_MB",
        "stage weights kept in --cache-dir, MiB (least recently used evicted first)",
        type=int,
        default=_env("WEIGHT_CACHE_MB", 4096, int),
    )
    _add(
        agent,
        "--measure-s",
        "MEASURE_S",
        "seconds spent measuring compute speed at start",
        type=float,
        default=_env("MEASURE_S", 0.5, float),
    )
    _add(
        agent,
        "--threads",
        "THREADS",
        "torch intra-op threads (0: torch's default)",
        type=int,
        default=_env("THREADS", 0, int),
    )
    _add(
        agent,
        "--max-inflight",
        "MAX_INFLIGHT",
        "microbatches worked on at once over all streams; more are refused (RESOURCE_EXHAUSTED)",
        type=int,
        default=_env("MAX_INFLIGHT", DEFAULT_MAX_INFLIGHT_MICROBATCHES, int),
    )
    _add(
        agent,
        "--power-modes",
        "POWER_MODES",
        "catalogue class whose power modes this device has (nvpmodel modes, power limits, "
        "cpufreq caps); applied by --power-mode-command, else by cpufreq caps where writable "
        "(root). An emulating agent has its class's modes, applied by pacing",
        default=_env("POWER_MODES", None),
    )
    _add(
        agent,
        "--power-mode-command",
        "POWER_MODE_COMMAND",
        "command that switches this device's power mode, run as CMD MODE (no shell; exit 0 = "
        "switched), e.g. a wrapper around nvpmodel",
        default=_env("POWER_MODE_COMMAND", ""),
    )
    _add(
        agent,
        "--device",
        "DEVICE",
        "torch device for stage compute (cpu, cuda, cuda:0)",
        default=_env("DEVICE", "cpu"),
    )
    _model_import_flag(agent)
    _common_daemon_flags(agent)
    add_security_flags(agent, agent=True)

    coord = sub.add_parser(
        "coordinator",
        help="run the coordinator daemon",
        description="Run the coordinator: admit agents, plan, deploy, serve the client API.",
    )
    _add(
        coord,
        "--listen",
        "COORDINATOR_LISTEN",
        "host:port the gRPC server binds",
        default=_env("COORDINATOR_LISTEN", "0.0.0.0:7070"),
    )
    _add(
        coord,
        "--advertise-host",
        "COORDINATOR_ADVERTISE_HOST",
        "host agents dial to fetch weights (default: the listen host, or 127.0.0.1)",
        default=_env("COORDINATOR_ADVERTISE_HOST", ""),
    )
    _add(
        coord,
        "--planner",
        "PLANNER",
        "host:port of the planner service",
        default=_env("PLANNER", "127.0.0.1:7071"),
    )
    _add(
        coord,
        "--agent",
        "AGENTS",
        "host:port of an agent to admit without mDNS; repeat for several "
        "(comma-separated in the env var)",
        action="append",
        default=None,
    )
    _add(
        coord,
        "--no-browse",
        "NO_BROWSE",
        "do not browse mDNS (static agents only)",
        action="store_true",
        default=_env_bool("NO_BROWSE"),
    )
    _add(
        coord,
        "--fleet-id",
        "FLEET_ID",
        "admit only agents of this fleet",
        default=_env("FLEET_ID", ""),
    )
    _add(
        coord,
        "--heartbeat-s",
        "HEARTBEAT_S",
        "health-check period per agent, seconds",
        type=float,
        default=_env("HEARTBEAT_S", 0.5, float),
    )
    _add(
        coord,
        "--dead-after-s",
        "DEAD_AFTER_S",
        "an agent silent this long is dead, seconds",
        type=float,
        default=_env("DEAD_AFTER_S", 2.0, float),
    )
    _add(
        coord,
        "--max-inflight",
        "MAX_INFLIGHT",
        "inference requests in flight at once (all callers); more are refused (RESOURCE_EXHAUSTED)",
        type=int,
        default=_env("MAX_INFLIGHT", DEFAULT_MAX_INFLIGHT_REQUESTS, int),
    )
    _add(
        coord,
        "--network-mbps",
        "NETWORK_MBPS",
        "shared LAN bandwidth the planner assumes",
        type=float,
        default=_env("NETWORK_MBPS", 1000.0, float),
    )
    _add(
        coord,
        "--network-latency-ms",
        "NETWORK_LATENCY_MS",
        "LAN latency the planner assumes",
        type=float,
        default=_env("NETWORK_LATENCY_MS", 0.5, float),
    )
    _add(
        coord,
        "--restore-wait-s",
        "RESTORE_WAIT_S",
        "after a restart, wait this long for the agents it last knew before re-deploying the "
        "jobs kept in --state-dir, seconds",
        type=float,
        default=_env("RESTORE_WAIT_S", 15.0, float),
    )
    _add(
        coord,
        "--no-pacing",
        "NO_PACING",
        "start with token-bucket pacing of activation flows off (SetPacing switches it live)",
        action="store_true",
        default=_env_bool("NO_PACING"),
    )
    _add(
        coord,
        "--no-persist",
        "NO_PERSIST",
        "keep no jobs in --state-dir: a restart forgets deployments and checkpoints",
        action="store_true",
        default=_env_bool("NO_PERSIST"),
    )
    _model_import_flag(coord)
    _common_daemon_flags(coord)
    add_security_flags(coord, coordinator=True)

    planner = sub.add_parser(
        "planner", help="run the planner service", description="Run the stateless planner service."
    )
    _add(
        planner,
        "--listen",
        "PLANNER_LISTEN",
        "host:port the gRPC server binds",
        default=_env("PLANNER_LISTEN", "0.0.0.0:7071"),
    )
    _common_daemon_flags(planner)
    add_security_flags(planner)

    health = sub.add_parser("health", help="check a daemon's gRPC health (exit 0 if SERVING)")
    health.add_argument("--address", default="127.0.0.1:7070", help="host:port to check")
    health.add_argument("--service", default="", help="service name ('' = the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="deadline, seconds")
    add_security_flags(health)

    demo = sub.add_parser(
        "demo",
        help="run the embedded local fleet demo",
        description="Start a planner, a coordinator and N agents emulating "
        "different devices on loopback, discover them by mDNS, plan, and run "
        "distributed inference checked against local execution.",
    )
    demo.add_argument("--agents", type=int, default=3, help="number of agents (default 3)")
    demo.add_argument(
        "--model",
        action="append",
        default=None,
        help="zoo model to run; repeat for several (default: gpt2-small, resnet18)",
    )
    demo.add_argument("--requests", type=int, default=5, help="requests per model (default 5)")
    demo.add_argument("--seed", type=int, default=0, help="weights and input seed")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.add_argument(
        "--no-train", action="store_true", help="skip the short distributed training run"
    )
    demo.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, unauthenticated fleet (development only; default: an "
        "ephemeral fleet CA and mutual TLS)",
    )

    fleet = sub.add_parser(
        "fleet", help="show the fleet a coordinator sees; create its CA; issue tokens"
    )
    fleet.add_argument(
        "--coordinator",
        default=_env("COORDINATOR", "127.0.0.1:7070"),
        help=f"host:port of the coordinator [env {ENV_PREFIX}COORDINATOR]",
    )
    fleet.add_argument("--json", action="store_true", help="print JSON")
    add_fleet_admin(fleet)

    bench = sub.add_parser("bench", help="benchmarks that print figures and write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    transport = bench_sub.add_parser("transport", help="activation-stream goodput vs raw TCP")
    transport.add_argument(
        "--json",
        dest="json_out",
        default=None,
        metavar="OUT",
        help="write the results as JSON to this file",
    )
    transport.add_argument(
        "--seconds", type=float, default=1.0, help="measuring time per tensor size (default 1.0)"
    )
    load = bench_sub.add_parser(
        "load", help="many concurrent clients against a process fleet: req/s, p99, memory"
    )
    load.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    load.add_argument("--seconds", type=float, default=120.0, help="measured time (default 120)")
    load.add_argument("--warmup", type=float, default=20.0, help="warm-up time (default 20)")
    load.add_argument("--model", default="resnet18", help="zoo model to serve (default resnet18)")
    load.add_argument(
        "--json",
        dest="json_out",
        default=None,
        metavar="OUT",
        help="write the results as JSON to this file",
    )
    from doramesh.bench.runtime import add_bench_runtime_parser

    add_bench_runtime_parser(bench_sub)
    bench_planner = bench_sub.add_parser(
        "planner", help="every planner on every scenario, scored by the simulator"
    )
    bench_planner.add_argument(
        "--scenarios", default="scenarios", help="scenario file or folder (default: scenarios/)"
    )
    bench_planner.add_argument(
        "--planner",
        action="append",
        default=None,
        help="planner to include; repeat for several (default: all)",
    )
    bench_planner.add_argument(
        "--json",
        dest="json_out",
        default=None,
        metavar="OUT",
        help="write the records as JSON to this file",
    )
    bench_planner.add_argument(
        "--markdown",
        dest="markdown_out",
        default=None,
        metavar="OUT",
        help="also write the table as Markdown to this file",
    )
    planning_time = bench_sub.add_parser(
        "planning-time", help="planning time on synthetic 16x96 and 64x200 fleets"
    )
    planning_time.add_argument(
        "--json",
        dest="json_out",
        default=None,
        metavar="OUT",
        help="write the results as JSON to this file",
    )

    from doramesh.testing.testbed_cli import add_bench_fleet_parser, add_testbed_parser

    add_bench_fleet_parser(bench_sub)
    add_testbed_parser(sub)

    from doramesh.train_cli import add_train_parser

    add_train_parser(sub)
    add_security_flags(sub.choices["train"])

    plan = sub.add_parser(
        "plan",
        help="plan a scenario file offline",
        description="Plan a scenario file (YAML, see scenarios/) offline and print the plan set.",
    )
    plan.add_argument("scenario", help="scenario file")
    plan.add_argument(
        "--planner",
        default="doramesh",
        help="doramesh or a baseline (single-device, uniform, memory-proportional,"
        " throughput-optimal, latency-optimal, data-parallel)",
    )
    plan.add_argument("--max-plans", type=int, default=4, help="plans in the set (default 4)")
    plan.add_argument("--json", action="store_true", help="print JSON")
    return parser


async def _serve(daemon: _Daemon, ready_file: Path | None) -> None:
    """Run a daemon until SIGINT/SIGTERM, then drain gracefully."""
    import structlog

    log = structlog.get_logger("cli")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    from doramesh.fleet_cli import ready_extra

    address = await daemon.start()
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": address, "pid": os.getpid(), **ready_extra(daemon)}))
        tmp.replace(ready_file)
    await stop.wait()
    log.info("draining", address=address)
    await daemon.stop(5.0)


def _run_agent(args: argparse.Namespace) -> None:
    from doramesh.agent.config import AgentSettings, default_node_id
    from doramesh.agent.server import AgentServer
    from doramesh.channels import set_default_credentials
    from doramesh.fleet_cli import daemon_credentials
    from doramesh.security.credentials import load_node_credentials

    _register_model_imports(args)
    # An enrolled device keeps the node id its certificate names.
    enrolled = None if args.insecure else load_node_credentials(args.state_dir)
    node_id = args.node_id or (enrolled.identity.name if enrolled and enrolled.identity else "")
    node_id = node_id or default_node_id()
    credentials = daemon_credentials(args, "agent", node_id)
    set_default_credentials(credentials)
    settings = AgentSettings(
        listen=args.listen,
        advertise_host=args.advertise_host,
        node_id=node_id,
        fleet_id=args.fleet_id or (credentials.fleet_id if credentials else ""),
        emulate=args.emulate,
        memory_limit_mb=args.memory_mb,
        mdns_interfaces=_mdns_interfaces(args),
        announce=not args.no_announce,
        cache_dir=args.cache_dir,
        weight_cache_mb=args.weight_cache_mb,
        measure_s=args.measure_s,
        threads=args.threads,
        device=args.device,
        max_inflight_microbatches=args.max_inflight,
        power_modes_class=args.power_modes,
        power_mode_command=tuple(shlex.split(args.power_mode_command)),
    )
    asyncio.run(_serve(AgentServer(settings, credentials=credentials), args.ready_file))


def _run_coordinator(args: argparse.Namespace) -> None:
    from doramesh.channels import set_default_credentials
    from doramesh.coordinator.config import CoordinatorSettings
    from doramesh.coordinator.server import CoordinatorServer
    from doramesh.fleet_cli import daemon_credentials
    from doramesh.security.authority import FleetAuthority
    from doramesh.security.credentials import holds_ca

    _register_model_imports(args)
    static = tuple(args.agent or _env_list("AGENTS"))
    credentials = daemon_credentials(args, "coordinator")
    set_default_credentials(credentials)
    authority = None
    if credentials is not None and holds_ca(args.state_dir):
        authority = FleetAuthority.load(args.state_dir)
    settings = CoordinatorSettings(
        listen=args.listen,
        advertise_host=args.advertise_host,
        planner=args.planner,
        static_agents=static,
        browse=not args.no_browse,
        mdns_interfaces=_mdns_interfaces(args),
        fleet_id=args.fleet_id or (credentials.fleet_id if credentials else ""),
        heartbeat_s=args.heartbeat_s,
        dead_after_s=args.dead_after_s,
        max_inflight_requests=args.max_inflight,
        network_mbps=args.network_mbps,
        network_latency_ms=args.network_latency_ms,
        enrol_listen=args.enrol_listen,
        state_dir="" if args.no_persist else str(args.state_dir),
        restore_wait_s=args.restore_wait_s,
        pacing=not args.no_pacing,
    )
    server = CoordinatorServer(settings, credentials=credentials, authority=authority)
    asyncio.run(_serve(server, args.ready_file))


def _run_planner(args: argparse.Namespace) -> None:
    from doramesh.channels import set_default_credentials
    from doramesh.fleet_cli import daemon_credentials
    from doramesh.planner.servicer import PlannerServer

    set_default_credentials(daemon_credentials(args, "planner"))
    asyncio.run(_serve(PlannerServer(args.listen), args.ready_file))


def _run_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from doramesh.channels import create_sync_channel
    from doramesh.fleet_cli import client_credentials

    credentials = client_credentials(args, args.address)
    with create_sync_channel(args.address, credentials=credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"{args.address}: {err.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _run_fleet(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from doramesh.errors import DoraMeshError
    from doramesh.fleet_cli import client_credentials, run_fleet_admin
    from doramesh.sdk import Client

    if args.action != "show":
        return run_fleet_admin(args)
    try:
        credentials = client_credentials(args, args.coordinator)
        with Client(args.coordinator, timeout=5, credentials=credentials) as client:
            agents = client.fleet()
    except DoraMeshError as err:
        print(f"doramesh fleet: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": a.profile.node_id,
                        "class": a.profile.device_class,
                        "state": a.state,
                        "address": a.profile.address,
                        "gflops": a.profile.gflops,
                        "memory_bytes": a.profile.memory_bytes,
                        "discovered_by": a.discovered_by,
                    }
                    for a in agents
                ],
                indent=2,
            )
        )
        return 0
    table = Table(title=f"fleet at {args.coordinator}")
    for col in ("agent", "class", "state", "address", "GFLOP/s", "memory MiB", "found by"):
        table.add_column(col)
    for a in agents:
        p = a.profile
        table.add_row(
            p.node_id,
            p.device_class,
            a.state,
            p.address,
            f"{p.gflops:.1f}",
            str(p.memory_bytes >> 20),
            a.discovered_by,
        )
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from doramesh.logging import configure_logging

    level = getattr(args, "log_level", "error" if args.command in {"demo", "bench"} else "info")
    configure_logging(level, json=True if getattr(args, "log_json", False) else None)
    handlers: dict[str, Callable[[argparse.Namespace], int | Awaitable[None] | None]] = {
        "agent": _run_agent,
        "coordinator": _run_coordinator,
        "planner": _run_planner,
        "health": _run_health,
        "fleet": _run_fleet,
    }
    if args.command == "demo":
        from doramesh.demo import run_demo

        sys.exit(run_demo(args))
    if args.command == "train":
        from doramesh.channels import set_default_credentials
        from doramesh.fleet_cli import client_credentials
        from doramesh.train_cli import run_train

        set_default_credentials(client_credentials(args, args.coordinator))

        sys.exit(run_train(args))
    if args.command == "testbed":
        from doramesh.testing.testbed_cli import run_testbed

        sys.exit(run_testbed(args))
    if args.command == "plan":
        from doramesh.plan_cli import run_plan

        sys.exit(run_plan(args.scenario, args.planner, args.json, args.max_plans))
    if args.command == "bench":
        if args.bench == "transport":
            from doramesh.bench.transport import main as transport_main

            transport_main(args.json_out, seconds_per_size=args.seconds)
            return
        if args.bench == "planner":
            from doramesh.bench.planner import main as planner_main

            sys.exit(planner_main(args.scenarios, args.json_out, args.planner, args.markdown_out))
        if args.bench == "load":
            from doramesh.bench.load import main as load_main

            sys.exit(
                load_main(
                    args.json_out,
                    clients=args.clients,
                    seconds=args.seconds,
                    warmup_s=args.warmup,
                    model=args.model,
                )
            )
        if args.bench == "fleet":
            from doramesh.testing.testbed_cli import run_bench_fleet

            sys.exit(run_bench_fleet(args))
        if args.bench == "runtime":
            from doramesh.bench.runtime import main as runtime_main

            sys.exit(runtime_main(args.json_out, requests=args.requests))
        if args.bench == "planning-time":
            from doramesh.bench.planning_time import main as planning_time_main

            planning_time_main(args.json_out)
            return
    from doramesh.errors import DoraMeshError

    try:
        code = handlers[args.command](args)
    except DoraMeshError as err:  # e.g. a daemon with no credentials: say why, no traceback
        print(f"doramesh {args.command}: {err.message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
