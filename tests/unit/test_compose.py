"""compose.yaml is parsed and every command it names is a real CLI command with valid flags.

(There is no Docker engine on CI; tests/integration/test_compose_commands.py runs the same
commands as processes.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from doramesh.cli import ENV_PREFIX, build_parser

ROOT = Path(__file__).resolve().parents[2]


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_the_services_and_host_networking() -> None:
    services = load_compose()["services"]
    assert {"planner", "coordinator", "agent"} <= set(services)
    for name, svc in services.items():
        assert svc["network_mode"] == "host", f"{name}: mDNS needs the host network"
        assert svc["build"] == ".", name
        assert "healthcheck" in svc, name
    assert services["agent"]["profiles"] == ["agent"], "the agent is optional on the compose box"
    assert (ROOT / "Dockerfile").exists()


@pytest.mark.parametrize("service", ["planner", "coordinator", "agent"])
def test_service_command_parses(service: str) -> None:
    svc = load_compose()["services"][service]
    argv = svc["command"]
    assert argv[0] == "doramesh"
    args = build_parser().parse_args(argv[1:])
    assert args.command == service


@pytest.mark.parametrize("service", ["planner", "coordinator", "agent"])
def test_healthcheck_command_parses(service: str) -> None:
    test = load_compose()["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "doramesh"
    args = build_parser().parse_args(test[2:])
    assert args.command == "health"


def test_every_environment_variable_is_one_the_cli_reads() -> None:
    parser = build_parser()
    helps = " ".join(
        action.help or ""
        for sub in parser._subparsers._group_actions  # type: ignore[union-attr]
        for p in sub.choices.values()  # type: ignore[union-attr]
        for action in p._actions
    )
    for name, svc in load_compose()["services"].items():
        for var in svc.get("environment", {}):
            if var in {"DORAMESH_LOG_JSON"}:
                continue
            assert var.startswith(ENV_PREFIX), f"{name}: {var}"
            assert f"env {var}]" in helps, f"{name}: {var} is not read by any CLI flag"


def test_depends_on_waits_for_a_healthy_planner() -> None:
    coord = load_compose()["services"]["coordinator"]
    assert coord["depends_on"]["planner"]["condition"] == "service_healthy"
