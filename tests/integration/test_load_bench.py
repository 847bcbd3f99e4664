"""`doramesh bench load` end to end, briefly: process fleet, concurrent clients, every answer
checked against local execution, memory sampled per daemon. The figures themselves (req/s, p99,
growth over minutes) are the benchmark's to report, not this test's to time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from doramesh.bench.load import MemoryTrace, main, rss_bytes

pytestmark = pytest.mark.slow


def test_memory_trace_flags_growth_and_accepts_noise() -> None:
    steady = MemoryTrace("a", 1, [(t, 100 * 2**20 + (t % 3) * 2**18) for t in range(-5, 60)])
    leaking = MemoryTrace("b", 2, [(t, 100 * 2**20 + t * 2**20) for t in range(-5, 60)])
    assert steady.summary()["flat"] is True
    assert leaking.summary()["flat"] is False
    assert MemoryTrace("c", 3, [(-1.0, 1)]).summary()["flat"] is None


def test_rss_of_this_process_is_read_and_a_missing_pid_is_none() -> None:
    import os

    assert (rss_bytes(os.getpid()) or 0) > 10 * 2**20
    assert rss_bytes(2**22 + 12345) is None


def test_short_load_run_answers_every_request_correctly(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    code = main(str(out), clients=4, seconds=4.0, warmup_s=2.0, model="mlp-tiny")
    record = json.loads(out.read_text())
    assert record["requests"] > 0 and record["errors"] == {} and record["wrong_results"] == 0
    assert {m["name"] for m in record["memory"]} >= {"coordinator", "planner", "agent-0"}
    assert record["latency_ms_p99"] >= record["latency_ms_p50"] > 0
    assert code == (0 if record["memory_flat"] else 1)
