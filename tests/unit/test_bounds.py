"""Bounded caches: each one named in the hardening issue is hit past its limit here.

(Discovered peers: ``test_discovery_bounds.py``; microbatches pending per stream:
``test_tensors.py`` and ``test_fuzz_codec.py``; requests and microbatches in flight:
``test_admission.py`` and ``tests/integration/test_load_shedding.py``.)
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from doramesh.agent import runtime as agent_runtime
from doramesh.agent.pacing import ComputePacer
from doramesh.agent.runtime import (
    MAX_CANCELLED_REQUESTS,
    MAX_RETIRED_STAGES,
    StageRuntime,
    WeightCache,
)
from doramesh.coordinator import weights
from doramesh.coordinator.weights import StageKey, WeightStore


@pytest.fixture
def fake_weights(monkeypatch: pytest.MonkeyPatch) -> list[StageKey]:
    """Stage weights of 100 bytes each, recording which were built."""
    built: list[StageKey] = []

    def write_stage_weights(model: str, seed: int, first: int, last: int, path: Path) -> str:
        built.append(StageKey(model, seed, first, last))
        path.write_bytes(bytes(100))
        return f"{seed:064x}"

    monkeypatch.setattr(weights.models, "write_stage_weights", write_stage_weights)
    return built


def test_weight_store_keeps_at_most_its_bytes_most_recent_first(
    fake_weights: list[StageKey], tmp_path: Path
) -> None:
    store = WeightStore(max_bytes=250, root=tmp_path)

    async def scenario() -> None:
        for seed in range(5):
            await store.get(StageKey("m", seed, 0, 0))
            await store.get(StageKey("m", 0, 0, 0))  # kept warm: never evicted
        assert len(store._by_key) == 2
        assert sum(size for _, size, _ in store._by_key.values()) <= 250
        assert StageKey("m", 0, 0, 0) in store._by_key
        before = len(fake_weights)
        await store.get(StageKey("m", 0, 0, 0))
        assert len(fake_weights) == before  # a hit builds nothing
        # A file being served when it is evicted stays readable to the end.
        f, size, _ = await store.open(StageKey("m", 0, 0, 0))
        with f:
            for seed in range(5, 8):
                await store.get(StageKey("m", seed, 0, 0))
            assert StageKey("m", 0, 0, 0) not in store._by_key
            assert len(f.read()) == size == 100

    asyncio.run(scenario())
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 250  # evicted files are gone


def test_weight_store_removes_its_own_directory() -> None:
    store = WeightStore(max_bytes=250)
    root = store.root
    assert root.is_dir()
    del store
    assert not root.exists()


def test_weight_store_keeps_no_lock_per_key_ever_asked(
    fake_weights: list[StageKey], tmp_path: Path
) -> None:
    """Any agent may ask for any seed: the per-key build locks must not outlive the builds."""
    store = WeightStore(max_bytes=250, root=tmp_path)

    async def scenario() -> None:
        await asyncio.gather(*(store.get(StageKey("m", s % 50, 0, 0)) for s in range(500)))

    asyncio.run(scenario())
    assert len(store._locks) == 0
    assert len(store._by_key) <= 2
    assert len(fake_weights) >= 50


@pytest.fixture
def runtime(tmp_path: Path) -> StageRuntime:
    return StageRuntime(memory_bytes=1 << 20, cache=WeightCache(tmp_path), pacer=ComputePacer(None))


def test_cancelled_requests_are_bounded_oldest_forgotten(runtime: StageRuntime) -> None:
    for i in range(MAX_CANCELLED_REQUESTS + 10):
        runtime.cancel(f"r{i}")
    assert len(runtime.cancelled) == MAX_CANCELLED_REQUESTS
    assert not runtime.is_cancelled("r0")
    assert runtime.is_cancelled(f"r{MAX_CANCELLED_REQUESTS + 9}")


def test_retired_stages_are_bounded_oldest_forgotten(
    runtime: StageRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_links(stage: Any) -> None:
        return None

    monkeypatch.setattr(agent_runtime, "_close_links", no_links)

    async def scenario() -> None:
        for i in range(MAX_RETIRED_STAGES + 10):
            runtime.stages[f"s{i}"] = SimpleNamespace(spec=SimpleNamespace(plan_epoch=i))  # type: ignore[assignment]
            assert await runtime.unload(f"s{i}")

    asyncio.run(scenario())
    assert len(runtime.retired) == MAX_RETIRED_STAGES
    assert "s0" not in runtime.retired
    assert runtime.retired[f"s{MAX_RETIRED_STAGES + 9}"] == MAX_RETIRED_STAGES + 9


def _put(cache: WeightCache, digest: str, data: bytes) -> None:
    """What a finished download does: a file in the cache, committed under its digest."""
    tmp = cache.tmp_path()
    tmp.write_bytes(data)
    cache.commit(digest, tmp)


def test_agent_weight_cache_keeps_at_most_its_bytes_least_recently_used_first(
    tmp_path: Path,
) -> None:
    cache = WeightCache(tmp_path, max_bytes=250)
    digests = [hashlib.sha256(bytes([i]) * 100).hexdigest() for i in range(4)]

    def put(i: int) -> None:
        _put(cache, digests[i], bytes([i]) * 100)
        # Distinct, increasing use times (a coarse file system clock must not decide the order).
        os.utime(cache.path(digests[i]), ns=(i * 10**9, i * 10**9))

    put(0)
    put(1)
    assert cache.get(digests[0]) is not None  # used now: newer than 1
    put(2)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(
        f"{d}.safetensors" for d in (digests[0], digests[2])
    )
    _put(cache, digests[3], bytes([3]) * 100)  # the newest always stays
    assert cache.get(digests[3]) is not None
    assert sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) <= 250
    big = WeightCache(tmp_path / "big", max_bytes=10)
    _put(big, digests[1], bytes([1]) * 100)  # larger than the bound: kept, it is in use
    assert big.get(digests[1]) is not None
