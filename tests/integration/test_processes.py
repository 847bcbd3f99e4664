"""Planner, coordinator and three agents as separate OS processes, started through the CLI with
the commands and environment compose.yaml names, find each other by mDNS on loopback and serve
a split inference. Nothing is shared between the processes but the network."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from doramesh import models
from doramesh.errors import DoraMeshError
from doramesh.sdk import Client
from doramesh.security.enrolment import token_credentials
from doramesh.testing import SubprocessFleet, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubprocessFleet]:
    fleet = SubprocessFleet(
        ("raspberry-pi-5", "jetson-orin-nano", "raspberry-pi-4"),
        workdir=tmp_path_factory.mktemp("procs"),
    )
    try:
        fleet.start(timeout=90)
        yield fleet
    finally:
        fleet.stop()


def test_processes_find_each_other_and_serve_split_inference(
    processes: SubprocessFleet,
) -> None:
    address = processes.daemons["coordinator"].address
    pids = {d.process.pid for d in processes.daemons.values()}
    assert len(pids) == 5 and os.getpid() not in pids
    with Client(address, timeout=60) as client:
        wait_for(lambda: len([a for a in client.fleet() if a.state == "alive"]) == 3, 30)
        assert {a.discovered_by for a in client.fleet()} == {"mdns"}
        dep = client.deploy("resnet18", seed=11, timeout=120)
        devices = {d.id for s in dep.plan.stages for d in s.devices}
        assert len(dep.plan.stages) >= 2 and len(devices) >= 2
        reference = models.build_blocks("resnet18", 11)
        x = models.example_input("resnet18", 2, seed=5, sample_shape=(3, 64, 64))
        got = client.infer("resnet18", x)
        with torch.inference_mode():
            assert (got - reference(x)).abs().max().item() <= 1e-5


def test_a_killed_agent_is_noticed_within_seconds(processes: SubprocessFleet) -> None:
    address = processes.daemons["coordinator"].address
    processes.kill("agent-2", signal.SIGKILL)
    start = time.monotonic()
    with Client(address, timeout=10) as client:
        wait_for(
            lambda: any(
                a.profile.node_id.endswith("-2") and a.state == "dead" for a in client.fleet()
            ),
            10,
        )
    assert time.monotonic() - start < 5.0


def test_sigterm_drains_and_exits_zero(processes: SubprocessFleet) -> None:
    agent = processes.daemons["agent-1"].process
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(15) == 0


def _compose() -> dict[str, dict[str, object]]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]  # type: ignore[no-any-return]


def test_compose_commands_start_and_serve(tmp_path: Path) -> None:
    """Run compose.yaml's own commands and environment, with ports moved to free loopback ones
    and mDNS kept on 127.0.0.1 (the tests never multicast on a real interface)."""
    services = _compose()
    procs: list[subprocess.Popen[bytes]] = []
    ports = {"planner": "0", "coordinator": "0", "agent": "0"}
    fleet_id = f"compose-{os.getpid()}-{time.monotonic_ns()}"

    def start(name: str, overrides: dict[str, str]) -> str:
        svc = services[name]
        argv = list(svc["command"])  # type: ignore[call-overload]
        assert argv[0] == "doramesh"
        env = {**os.environ, **{k: str(v) for k, v in svc["environment"].items()}}  # type: ignore[attr-defined]
        ready = tmp_path / f"{name}.ready"
        env.update(overrides)
        env.update(
            {
                "DORAMESH_READY_FILE": str(ready),
                "DORAMESH_MDNS_INTERFACES": "127.0.0.1",
                "DORAMESH_FLEET_ID": fleet_id,
                "DORAMESH_CACHE_DIR": str(tmp_path / "cache"),
            }
        )
        log = (tmp_path / f"{name}.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "doramesh", *argv[1:]],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(ready.exists, 60)
        import json

        return str(json.loads(ready.read_text())["address"])

    # The fleet's security as compose.yaml documents it: `fleet init` makes the CA in the
    # state dir the planner and coordinator share; the agent enrols with a one-time join token.
    cli = [sys.executable, "-m", "doramesh"]
    fleet_state = {"DORAMESH_STATE_DIR": str(tmp_path / "fleet-state")}
    agent_state = {"DORAMESH_STATE_DIR": str(tmp_path / "agent-state")}
    init = [*cli, "fleet", "init", "--state-dir", fleet_state["DORAMESH_STATE_DIR"]]
    subprocess.run([*init, "--fleet-id", fleet_id], check=True, timeout=60)

    def fleet_cli(*args: str) -> str:
        out = subprocess.run(
            [*cli, "fleet", *args, "--state-dir", fleet_state["DORAMESH_STATE_DIR"]],
            check=True,
            timeout=60,
            capture_output=True,
        )
        return out.stdout.decode().strip()

    try:
        planner = start(
            "planner",
            {"DORAMESH_PLANNER_LISTEN": f"127.0.0.1:{ports['planner']}", **fleet_state},
        )
        coordinator = start(
            "coordinator",
            {
                "DORAMESH_COORDINATOR_LISTEN": "127.0.0.1:0",
                "DORAMESH_COORDINATOR_ENROL_LISTEN": "127.0.0.1:0",
                "DORAMESH_PLANNER": planner,
                **fleet_state,
            },
        )
        import json

        enrol = json.loads((tmp_path / "coordinator.ready").read_text())["enrol_address"]
        agent = start(
            "agent",
            {
                "DORAMESH_AGENT_LISTEN": "127.0.0.1:0",
                "DORAMESH_NODE_ID": "compose-agent",
                "DORAMESH_EMULATE": "raspberry-pi-5",
                "DORAMESH_JOIN_TOKEN": fleet_cli("join-token"),
                "DORAMESH_ENROLL": enrol,
                **agent_state,
            },
        )
        states = {"planner": fleet_state, "agent": agent_state, "coordinator": fleet_state}
        for name in ("planner", "agent", "coordinator"):
            health = services[name]["healthcheck"]["test"]  # type: ignore[index]
            argv = list(health[2:])  # type: ignore[index]
            argv[argv.index("--address") + 1] = {
                "planner": planner,
                "agent": agent,
                "coordinator": coordinator,
            }[name]
            env = {**os.environ, **states[name]}
            subprocess.run([*cli, *argv], check=True, timeout=30, env=env)
        # An app with an app token only (no certificate) calls the client API on the TLS port.
        app = token_credentials(enrol, fleet_cli("app-token"))
        with Client(enrol, timeout=30, credentials=app) as client:
            wait_for(lambda: len(client.fleet()) == 1, 30)
            dep = client.deploy("mlp-tiny", timeout=120)
            assert dep.plan.stages[0].devices[0].id == "compose-agent"
            out = client.infer("mlp-tiny", models.example_input("mlp-tiny", 1))
            assert out.shape[0] == 1
    except (DoraMeshError, TimeoutError, subprocess.CalledProcessError):
        for log in tmp_path.glob("*.log"):
            print(log.name, log.read_text()[-3000:])
        raise
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                assert proc.wait(15) == 0
            except subprocess.TimeoutExpired:
                proc.kill()
