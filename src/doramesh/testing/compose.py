"""Read ``compose.yaml`` so the testbed starts the services with the commands it names.

Only what a process needs is taken: the command, the environment, the health check and the
``depends_on`` order. The testbed then adds what host networking on a real LAN would have given
(the box's LAN address, the interface mDNS uses), so the file itself is exercised, not copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_FILE = ROOT / "compose.yaml"


@dataclass(frozen=True, slots=True)
class ComposeService:
    name: str
    command: tuple[str, ...]
    environment: Mapping[str, str]
    #: The health check's argv (compose's ``["CMD", ...]`` without the ``CMD``), if any.
    healthcheck: tuple[str, ...] | None
    depends_on: tuple[str, ...]


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, ComposeService]:
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        raise ValueError(f"{path}: no services")
    services = {}
    for name, raw in doc["services"].items():
        services[name] = _service(str(name), raw, path)
    return services


def _service(name: str, raw: Any, path: Path) -> ComposeService:
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: services.{name} is not a mapping")
    command = raw.get("command")
    if isinstance(command, str):
        command = command.split()
    if not isinstance(command, list) or not command:
        raise ValueError(f"{path}: services.{name}.command must be a non-empty list")
    env_raw = raw.get("environment") or {}
    if isinstance(env_raw, list):
        env_raw = dict(item.split("=", 1) for item in env_raw)
    environment = {str(k): "" if v is None else str(v) for k, v in env_raw.items()}
    health = None
    test = (raw.get("healthcheck") or {}).get("test")
    if isinstance(test, list) and test and test[0] in {"CMD", "CMD-SHELL"}:
        health = tuple(str(a) for a in test[1:]) if test[0] == "CMD" else ("sh", "-c", test[1])
    depends = raw.get("depends_on") or ()
    return ComposeService(
        name=name,
        command=tuple(str(a) for a in command),
        environment=environment,
        healthcheck=health,
        depends_on=tuple(depends),
    )


def start_order(services: Mapping[str, ComposeService], names: tuple[str, ...]) -> list[str]:
    """``names`` and what they depend on, dependencies first (compose's start order)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"compose depends_on cycle: {' -> '.join((*path, name))}")
        for dep in services[name].depends_on:
            visit(dep, (*path, name))
        order.append(name)

    for name in names:
        visit(name, ())
    return order
