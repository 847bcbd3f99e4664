"""Regenerate the gRPC stubs from protos/ into src/doramesh/v1/.

Usage: python scripts/gen_protos.py [--out DIR]

The stubs are committed; tests/unit/test_stubs_fresh.py regenerates them into a temporary
directory and fails if anything differs, so the contract and the code cannot drift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(PROTOS.glob("doramesh/v1/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(s.relative_to(PROTOS)) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "doramesh" / "v1").glob("*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="root to write doramesh/v1/ under")
    args = parser.parse_args()
    out = args.out or ROOT / "src"
    files = generate(out)
    print(f"generated {len(files)} files under {out / 'doramesh' / 'v1'}", file=sys.stderr)


if __name__ == "__main__":
    main()
