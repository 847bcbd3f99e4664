"""A fleet across namespace hosts: discovery by real mDNS over the bridge, split inference and
training equal to one-process results, and a bandwidth drop and an agent kill mid-run that cost
no request.

The client runs in the test process and reaches the coordinator over the testbed's veth from the
root namespace; every activation crosses the shaped bridge between host namespaces.
"""

from __future__ import annotations

import ipaddress
import threading
import time

import torch
import torch.nn.functional as F

from doramesh import models
from doramesh.sdk import Client
from doramesh.testing.testbed import Testbed
from doramesh.training import OptimizerSpec, SyntheticData
from doramesh.types import DeviceShare, Plan, PlanId, Prediction, StagePlan

TOLERANCE = 1e-5
SHAPE = (3, 64, 64)


def _plan(stages: list[tuple[int, int, list[tuple[str, float]]]], name: str) -> Plan:
    return Plan(
        plan_id=PlanId(name),
        stages=tuple(
            StagePlan(a, b, tuple(DeviceShare(d, s) for d, s in devs)) for a, b, devs in stages
        ),
        microbatch=1,
        flows=(),
        predicted=Prediction(0.0, 0.0, 0.0),
    )


def test_agents_on_every_host_found_by_mdns(testbed: Testbed) -> None:
    with Client(testbed.coordinator_address, timeout=10) as client:
        agents = client.fleet()
    assert {a.profile.node_id for a in agents} == {h.node_id for h in testbed.hosts}
    assert {a.discovered_by for a in agents} == {"mdns"}
    assert all(a.state == "alive" for a in agents)
    assert testbed.lan is not None
    hosts = {a.profile.address.rsplit(":", 1)[0] for a in agents}
    assert len(hosts) == len(agents), "one address per host namespace"
    for host in hosts:
        assert ipaddress.ip_address(host) in testbed.lan.subnet


def test_split_inference_across_hosts_matches_local(testbed: Testbed) -> None:
    plan = _plan(
        [(0, 3, [("pi5", 1.0)]), (4, 6, [("orin", 1.0)]), (7, 9, [("pi4", 1.0)])], "three-hosts"
    )
    reference = models.build_blocks("resnet18", 7)
    with Client(testbed.coordinator_address, timeout=120) as client:
        dep = client.deploy("resnet18", seed=7, plan=plan)
        assert {d.id for s in dep.plan.stages for d in s.devices} == {"pi5", "orin", "pi4"}
        sent = {h.node_id: testbed.tx_bytes(h.node_id) for h in testbed.hosts}
        stage0_bytes = 0
        for i in range(3):
            x = models.example_input("resnet18", 2, seed=i, sample_shape=SHAPE)
            got = client.infer("resnet18", x)
            with torch.inference_mode():
                want = reference(x)
                stage0_bytes += reference[:4](x).numel() * 4
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= TOLERANCE
    # The activations crossed the LAN: pi5 sent at least stage 0's outputs to orin.
    assert testbed.tx_bytes("pi5") - sent["pi5"] >= stage0_bytes


def test_training_across_hosts_matches_local(testbed: Testbed) -> None:
    n = models.get_spec("resnet18").num_blocks
    plan = _plan(
        [
            (0, 2, [("pi5", 1.0)]),
            (3, n - 4, [("orin", 0.5), ("pi4", 0.5)]),
            (n - 3, n - 1, [("pi5", 1.0)]),
        ],
        "training-three-hosts",
    )
    steps, batch, lr, momentum = 4, 8, 0.01, 0.9
    shape = (3, 32, 32)
    with Client(testbed.coordinator_address, timeout=120) as client:
        progress = list(
            client.train(
                "resnet18",
                steps=steps,
                batch=batch,
                microbatches=2,
                optimizer=OptimizerSpec("sgd", lr=lr, momentum=momentum),
                seed=11,
                data_seed=5,
                sample_shape=shape,
                dataset_batches=2,
                plan=plan,
                timeout=600,
            )
        )
    model = models.build_blocks("resnet18", 11)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    data = SyntheticData.for_model("resnet18", 5, batch, shape, distinct_batches=2)
    local = []
    for step in range(1, steps + 1):
        x, y = data.step(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        local.append(loss.item())
    assert [p.step for p in progress] == list(range(1, steps + 1))
    for p, want in zip(progress, local, strict=True):
        assert abs(p.loss - want) <= TOLERANCE, (p.step, p.loss, want)


def _stream_with_fault(
    testbed: Testbed, requests: int, fault_at: int, fault: threading.Thread, seed: int
) -> tuple[list[float], list[int], int]:
    """Stream ``requests`` through the deployed resnet18; start ``fault`` at the fault_at-th
    answer; check every answer against the local model. Returns latencies and plan epochs."""
    reference = models.build_blocks("resnet18", seed)
    inputs = [
        models.example_input("resnet18", 1, seed=i, sample_shape=SHAPE) for i in range(requests)
    ]
    latencies, epochs = [], []
    with Client(testbed.coordinator_address, timeout=300) as client:
        results = []
        for r in client.infer_many("resnet18", inputs):
            results.append(r)
            latencies.append(r.latency_ms)
            epochs.append(r.plan_epoch)
            if len(results) == fault_at:
                fault.start()
        failed = client.job_status("resnet18").requests_failed
    fault.join()
    assert [r.request_id for r in results] == [str(i) for i in range(requests)]
    with torch.inference_mode():
        for x, r in zip(inputs, results, strict=True):
            assert (r.output - reference(x)).abs().max().item() <= TOLERANCE
    return latencies, epochs, failed


def test_bandwidth_drop_mid_run_loses_nothing(testbed: Testbed) -> None:
    """The shared medium drops from 200 to 8 Mbit/s (tc change on the ifb's tbf) mid-stream:
    every answer still arrives, correct, and the drop shows in the measured latency."""
    plan = _plan([(0, 4, [("pi5", 1.0)]), (5, 9, [("orin", 1.0)])], "two-hosts")
    with Client(testbed.coordinator_address, timeout=120) as client:
        client.deploy("resnet18", seed=3, plan=plan)
    drop = threading.Thread(target=testbed.set_bandwidth, args=(8.0,))
    try:
        latencies, _, failed = _stream_with_fault(testbed, 40, 15, drop, seed=3)
    finally:
        testbed.set_bandwidth(200.0)
    assert failed == 0
    before = sorted(latencies[3:14])[len(latencies[3:14]) // 2]
    after = sorted(latencies[25:])[len(latencies[25:]) // 2]
    # stage 0's output (64x16x16 floats at 64x64 input = 64 KiB) takes ~2.6 ms at 200 Mbit/s
    # and ~65 ms at 8 Mbit/s
    assert after > before + 30, (before, after)


def test_agent_killed_mid_run_loses_nothing(testbed: Testbed) -> None:
    """SIGKILL the host running the middle of the pipeline mid-stream: the coordinator marks it
    dead, re-plans on the survivors and replays the in-flight requests; all answers arrive."""
    plan = _plan(
        [(0, 3, [("pi5", 1.0)]), (4, 6, [("orin", 1.0)]), (7, 9, [("pi4", 1.0)])],
        "three-hosts-kill",
    )
    with Client(testbed.coordinator_address, timeout=120) as client:
        client.deploy("resnet18", seed=2, plan=plan)
    kill = threading.Thread(target=testbed.kill_agent, args=("orin",))
    start = time.monotonic()
    try:
        _, epochs, _ = _stream_with_fault(testbed, 40, 10, kill, seed=2)
    finally:
        testbed.start_agent("orin")
        testbed.wait_for_agents(["orin"], 60)
    assert len(set(epochs)) >= 2, "the tail of the stream ran on a new plan"
    assert time.monotonic() - start < 120


#: The coordinator's dead-after window (2 s) plus a heartbeat and slack for a loaded 2-core box.
PARTITION_DETECTION_S = 6.0


def test_partitioned_host_mid_run_loses_nothing(testbed: Testbed) -> None:
    """iptables cuts the host running the middle of the pipeline off the LAN mid-stream (its
    packets vanish: no reset, connections just hang). The coordinator declares it dead within
    the stated bound, replays what was in flight on a new plan, and every answer arrives once,
    equal to local; healed, the host is admitted again."""
    plan = _plan(
        [(0, 3, [("pi5", 1.0)]), (4, 6, [("orin", 1.0)]), (7, 9, [("pi4", 1.0)])],
        "three-hosts-cut",
    )
    with Client(testbed.coordinator_address, timeout=120) as client:
        client.deploy("resnet18", seed=4, plan=plan)
    detected: list[float] = []

    def cut_and_time() -> None:
        start = time.monotonic()
        testbed.cut("orin")
        testbed.wait_for_agents(["orin"], 3 * PARTITION_DETECTION_S, state="dead")
        detected.append(time.monotonic() - start)

    try:
        _, epochs, _ = _stream_with_fault(
            testbed, 40, 10, threading.Thread(target=cut_and_time), seed=4
        )
    finally:
        testbed.heal("orin")
    assert detected and detected[0] <= PARTITION_DETECTION_S, detected
    assert len(set(epochs)) >= 2, "the tail of the stream ran on a new plan"
    testbed.wait_for_agents(["orin"], 30)


def test_lossy_link_mid_run_loses_nothing(testbed: Testbed) -> None:
    """5% of the packets the middle host receives are dropped (iptables statistic) from the
    middle of the stream on: TCP retransmits, every answer arrives once, equal to local."""
    plan = _plan(
        [(0, 3, [("pi5", 1.0)]), (4, 6, [("orin", 1.0)]), (7, 9, [("pi4", 1.0)])],
        "three-hosts-lossy",
    )
    testbed.wait_for_agents(["pi5", "orin", "pi4"], 30)
    with Client(testbed.coordinator_address, timeout=120) as client:
        client.deploy("resnet18", seed=5, plan=plan)
    lossy = threading.Thread(target=testbed.loss, args=("orin", 0.05))
    try:
        _stream_with_fault(testbed, 40, 10, lossy, seed=5)
    finally:
        testbed.clear_loss("orin", 0.05)
