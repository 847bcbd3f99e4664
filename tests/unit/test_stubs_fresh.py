"""The committed stubs are exactly what the pinned grpcio-tools makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerated_stubs_match_the_committed_ones(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "doramesh" / "v1").glob("*.py*")}
    committed = {
        p.name: p.read_bytes() for p in (ROOT / "src" / "doramesh" / "v1").glob("*_pb2*.py*")
    }
    assert fresh.keys() == committed.keys()
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stubs out of date, run scripts/gen_protos.py: {stale}"


def test_every_tensor_message_carries_dtype_shape_and_length() -> None:
    from doramesh.v1 import agent_pb2, common_pb2

    meta_fields = {f.name for f in common_pb2.TensorMeta.DESCRIPTOR.fields}
    assert meta_fields == {"dtype", "shape", "byte_length"}
    assert common_pb2.Tensor.DESCRIPTOR.fields_by_name["meta"].message_type.name == "TensorMeta"
    header = agent_pb2.ActivationHeader.DESCRIPTOR.fields_by_name["meta"]
    assert header.message_type.name == "TensorMeta"
