"""Faults on a fleet of real OS processes (the daemons started through the CLI): an agent frozen
(SIGSTOP) or killed (SIGKILL) in the middle of a request stream, and a graceful drain on SIGTERM.
Every request completes exactly once with the local result, and detection happens within the
coordinator's dead-after window (2 s by default) plus one health-check period."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from doramesh import models
from doramesh.sdk import Client
from doramesh.testing import SubprocessFleet, wait_for
from doramesh.types import QoESpec

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
REQUESTS = 120
SHAPE = (3, 32, 32)
CLASSES = ("raspberry-pi-5", "jetson-orin-nano", "raspberry-pi-4", "mini-pc")
#: dead_after_s (2.0) + heartbeat (0.5) + slack for a loaded 2-core CI box.
DETECTION_BOUND_S = 6.0


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SubprocessFleet]:
    procs = SubprocessFleet(CLASSES, workdir=tmp_path)
    try:
        procs.start(timeout=120)
        yield procs
    finally:
        for daemon in procs.daemons.values():
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGCONT)
        procs.stop()


def _agent_name(fleet: SubprocessFleet, node_id: str) -> str:
    index = next(i for i, cls in enumerate(CLASSES) if node_id == f"{cls}-{i}")
    return f"agent-{index}"


def _stream_with_fault(fleet: SubprocessFleet, sig: int) -> str:
    """Run the stream, strike one planned agent with ``sig`` mid-way; returns its name."""
    address = fleet.daemons["coordinator"].address
    with Client(address, timeout=300) as client:
        wait_for(lambda: sum(a.state == "alive" for a in client.fleet()) == len(CLASSES), 30)
        dep = client.deploy("resnet18", seed=3, qoe=QoESpec(objective="max_throughput"))
        used = sorted({d.id for s in dep.plan.stages for d in s.devices})
        assert len(used) >= 2
        victim = used[0]
        reference = models.build_blocks("resnet18", 3)
        inputs = [
            models.example_input("resnet18", 1, seed=i, sample_shape=SHAPE) for i in range(REQUESTS)
        ]
        results = []
        struck_at: list[float] = []
        for result in client.infer_many("resnet18", inputs):
            results.append(result)
            if len(results) == 30 and not struck_at:
                fleet.kill(_agent_name(fleet, victim), sig)
                struck_at.append(time.monotonic())
                threading.Thread(
                    target=_wait_dead, args=(address, victim, struck_at), daemon=True
                ).start()
        wait_for(lambda: len(struck_at) == 2, DETECTION_BOUND_S * 2)
        status = client.job_status("resnet18")
    assert [r.request_id for r in results] == [str(i) for i in range(REQUESTS)]
    with torch.inference_mode():
        for x, r in zip(inputs, results, strict=True):
            assert (r.output - reference(x)).abs().max().item() <= TOLERANCE
    assert struck_at[1] - struck_at[0] <= DETECTION_BOUND_S
    assert victim not in {d.id for s in status.deployment.plan.stages for d in s.devices}
    return _agent_name(fleet, victim)


def _wait_dead(address: str, node_id: str, struck_at: list[float]) -> None:
    with Client(address, timeout=5) as client:
        wait_for(
            lambda: any(a.profile.node_id == node_id and a.state == "dead" for a in client.fleet()),
            DETECTION_BOUND_S * 2,
        )
    struck_at.append(time.monotonic())


def test_a_frozen_agent_costs_no_request(fleet: SubprocessFleet) -> None:
    _stream_with_fault(fleet, signal.SIGSTOP)


def test_a_killed_agent_process_costs_no_request(fleet: SubprocessFleet) -> None:
    _stream_with_fault(fleet, signal.SIGKILL)


def test_sigterm_mid_stream_drains_loses_nothing_and_exits_zero(fleet: SubprocessFleet) -> None:
    """SIGTERM: health goes NOT_SERVING at once (the coordinator moves work away without
    waiting for the dead-after window), in-flight work finishes, the process exits 0."""
    name = _stream_with_fault(fleet, signal.SIGTERM)
    assert fleet.daemons[name].process.wait(15) == 0
