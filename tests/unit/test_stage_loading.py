"""Loading a stage streams: the coordinator writes a stage's file from the module's tensors,
and an agent maps its cached file instead of reading it into a buffer, so neither holds the
stage twice (a Raspberry Pi holding a 1 GiB stage has no room for a second copy)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from doramesh import models
from doramesh.agent.pacing import ComputePacer
from doramesh.agent.runtime import StageRuntime, StageSpec, WeightCache


def test_written_file_is_the_served_bytes_and_loads_equal(tmp_path: Path) -> None:
    for name, first, last in [("mlp-tiny", 0, 3), ("gpt2-small", 1, 2)]:
        data, digest = models.stage_weights(name, 5, first, last)
        path = tmp_path / f"{name}.safetensors"
        assert models.write_stage_weights(name, 5, first, last, path) == digest
        assert path.read_bytes() == data
        assert models.file_sha256(path) == digest
        assert not list(tmp_path.glob("*.tmp*"))

    loaded = models.load_stage("gpt2-small", 1, 2, tmp_path / "gpt2-small.safetensors")
    built = models.build_blocks("gpt2-small", 5, 1, 2)
    x = models.build_blocks("gpt2-small", 5, 0, 0)(models.example_input("gpt2-small", 1))
    with torch.inference_mode():
        want = built(x)
        # Evicting the cached file removes its name only: the loaded stage keeps its weights.
        (tmp_path / "gpt2-small.safetensors").unlink()
        assert torch.equal(loaded(x), want)


def test_runtime_load_from_cache_verifies_and_refetches_a_corrupt_file(tmp_path: Path) -> None:
    _, digest = models.stage_weights("mlp-tiny", 0, 1, 2)
    cache = WeightCache(tmp_path)
    models.write_stage_weights("mlp-tiny", 0, 1, 2, cache.path(digest))
    assert cache.get(digest) == cache.path(digest)
    runtime = StageRuntime(memory_bytes=1 << 30, cache=cache, pacer=ComputePacer(None))
    spec = StageSpec("s0", 1, "mlp-tiny", 0, 1, 2, digest, "127.0.0.1:1")
    _, cache_hit, _ = asyncio.run(runtime.load(spec))
    assert cache_hit
    with cache.path(digest).open("r+b") as f:  # a flipped byte on disk
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert cache.get(digest) is None
    assert not cache.path(digest).exists()


def test_stale_downloads_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (tmp_path / f"incoming-{dead}-x.tmp").write_bytes(b"half")
    cache = WeightCache(tmp_path)
    mine = cache.tmp_path()
    mine.write_bytes(b"in progress")
    WeightCache(tmp_path)
    assert [p.name for p in tmp_path.glob("incoming-*.tmp")] == [mine.name]


_PEAK = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import torch
    from doramesh import models
    from doramesh.agent.pacing import ComputePacer
    from doramesh.agent.runtime import StageRuntime, StageSpec, WeightCache

    def hwm() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    root, digest = Path(sys.argv[1]), sys.argv[2]
    # The model code's own memory (its profile, a skeleton) before the mark.
    models.layer_table("gpt2-small")
    models.skeleton_blocks("gpt2-small", 1, 6)
    torch.ones(1) + 1
    before = hwm()
    runtime = StageRuntime(memory_bytes=1 << 32, cache=WeightCache(root), pacer=ComputePacer(None))
    spec = StageSpec("s", 1, "gpt2-small", 0, 1, 6, digest, "127.0.0.1:1")
    stage, hit, _ = asyncio.run(runtime.load(spec))
    assert hit
    with torch.inference_mode():  # touch every weight
        total = sum(float(p.sum()) for p in stage.module.parameters())
    print(hwm() - before)
    """
)


def test_loading_a_cached_stage_holds_its_weights_once(tmp_path: Path) -> None:
    """Peak memory of an agent loading (and touching) a 170 MB stage from its cache stays near
    the stage's size; reading the file into bytes and deserialising them took twice that."""
    digest = models.write_stage_weights("gpt2-small", 0, 1, 6, tmp_path / "stage.tmp")
    (tmp_path / "stage.tmp").rename(tmp_path / f"{digest}.safetensors")
    size = (tmp_path / f"{digest}.safetensors").stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(tmp_path), digest],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 1.3 * size, f"loading a {size} B stage raised the peak by {grew} B"
