"""Run mypy (strict) over the doramesh package as it is installed.

The distribution maps ``doramesh.agent`` etc. onto ``services/*`` (setuptools package-dir),
which an editable install resolves with an import hook that mypy cannot follow. This script
mirrors the installed layout as a tree of symlinks in a temporary folder and checks that.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = {"agent", "coordinator", "planner"}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="doramesh-mypy-") as tmp:
        pkg = Path(tmp) / "doramesh"
        pkg.mkdir()
        for entry in (ROOT / "src" / "doramesh").iterdir():
            if entry.name != "__pycache__":
                (pkg / entry.name).symlink_to(entry)
        for name in SERVICES:
            (pkg / name).symlink_to(ROOT / "services" / name)
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "-p",
            "doramesh",
            *sys.argv[1:],
        ]
        return subprocess.run(cmd, cwd=tmp, env={"MYPYPATH": tmp, **_env()}).returncode


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "MYPYPATH"}


if __name__ == "__main__":
    raise SystemExit(main())
