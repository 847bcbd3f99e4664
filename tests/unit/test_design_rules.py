"""Design rules as tests: what may import what."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Pure planning code: no gRPC, no torch, no protobuf (servicer.py is the planner's edge).
PURE_PLANNER = ["cost", "dp", "api"]
#: Domain modules that must not see generated protobuf types.
DOMAIN = [
    ROOT / "src" / "doramesh" / "types.py",
    ROOT / "services" / "coordinator" / "registry.py",
    *[ROOT / "services" / "planner" / f"{m}.py" for m in PURE_PLANNER],
    ROOT / "services" / "agent" / "catalogue.py",
    ROOT / "services" / "agent" / "pacing.py",
    ROOT / "src" / "doramesh" / "tokenbucket.py",
]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", PURE_PLANNER)
def test_pure_planner_loads_without_grpc_or_torch(module: str) -> None:
    code = (
        f"import sys, doramesh.planner.{module}; "
        "bad = [m for m in ('grpc', 'torch', 'google.protobuf') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOMAIN, ids=lambda p: p.name)
def test_domain_modules_do_not_import_generated_code(path: Path) -> None:
    bad = {name for name in _imports(path) if "_pb2" in name or name.startswith("doramesh.v1")}
    assert not bad, f"{path.name} imports {bad}"


def test_nothing_unpickles() -> None:
    offenders = []
    for folder in ("src", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            if "/v1/" in str(path):
                continue
            names = _imports(path)
            text = path.read_text()
            if "pickle" in names or "torch.load(" in text or "torch.save(" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_channels_are_made_in_one_module() -> None:
    offenders = []
    for folder in ("src", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "channels.py" or "/v1/" in str(path) or "bench" in path.parts:
                continue
            text = path.read_text()
            for call in ("insecure_channel(", "secure_channel(", "aio.server(", "grpc.server("):
                if call in text:
                    offenders.append(f"{path.relative_to(ROOT)}: {call}")
    assert not offenders
