"""``doramesh bench runtime``: the runtime measured side by side in one run, on the embedded
local fleet (in-process agents emulating catalogue devices, real gRPC on loopback).

1. **Pipeline throughput vs prediction.** The planner's best plan for resnet18 on the fleet's
   first half, fed a stream of requests at the profiled input size; measured samples/s over the
   plan's predicted throughput (``throughput_ratio``).
2. **The adapter under events.** Two plans live at once (the planner's best plan on each half of
   the fleet), ``requests`` requests from a closed loop of a few concurrent callers (each
   answer checked once); mid-stream one agent of the first plan is
   slowed 3x (then restored), later one agent of the second plan is killed. Reported: the time
   from each event to re-weighted dispatch (``adapter_reweight_ms``), the time until the
   background re-planning's new plans were live (``replan_live_s``), and per request: answered
   once, equal to the local model (``lost_requests``, ``duplicate_results``, ``wrong_results``).
3. **Training.** A few steps of resnet18 across three agents (one stage replicated on two), its
   parameters compared with one-process training (``training_max_rel_param_diff``).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from doramesh import models
from doramesh.coordinator.deploy import Deployer
from doramesh.errors import DoraMeshError
from doramesh.sdk import AsyncClient
from doramesh.testing import LocalFleet
from doramesh.testing.fleet import wait_for_async
from doramesh.types import (
    DeviceShare,
    NodeId,
    Plan,
    PlanId,
    Prediction,
    QoESpec,
    StagePlan,
    Workload,
)

MODEL = "resnet18"
#: Device classes of the fleet, two halves of two Pi 4 each. The slowest catalogue devices:
#: every emulated device busy at once asks this host for their summed GFLOP/s of real compute
#: (4 x 11.8), which a shared 2-core machine can just about give; faster classes would make
#: the host, not the emulation, set the pace.
CLASSES = ("raspberry-pi-4", "raspberry-pi-4", "raspberry-pi-4", "raspberry-pi-4")
#: Requests in flight in the adapter phase (a closed loop): few enough that the emulated
#: devices' compute fits on this host's cores, so the host does not slow the "devices" itself.
WORKERS = 3
#: Input of the adapter phase: smaller than the profiled 224x224 to keep the run short.
EVENT_SHAPE = (3, 128, 128)
SLOWDOWN = 3.0
#: The slowed plan counts as re-weighted once its share is below this fraction of its share
#: before (3x slower moves it to about a third of its rate).
SHIFTED = 0.8
TOLERANCE = 1e-5
TRAIN_STEPS = 3
TRAIN_SHAPE = (3, 32, 32)
TRAIN_BATCH = 8
TRAIN_LR = 0.01
TRAIN_MOMENTUM = 0.9


def _deployer(fleet: LocalFleet) -> Deployer:
    assert fleet.coordinator is not None and fleet.coordinator.deployer is not None
    return fleet.coordinator.deployer


async def _throughput(client: AsyncClient, plan: Plan, n: int) -> dict[str, Any]:
    """Phase 1: the planner's plan for two agents, a stream of ``n`` requests at the profiled
    input size (its prediction's size)."""
    dep = await client.deploy(MODEL, seed=1, plans=[plan])
    inputs = [models.example_input(MODEL, 1, seed=i) for i in range(n)]
    arrivals: list[float] = []
    async for _ in client.infer_many(MODEL, inputs):
        arrivals.append(time.perf_counter())
    # Steady state: from the first answers (the pipeline filled) to the last.
    skip = min(5, n // 4)
    measured = (n - 1 - skip) / (arrivals[-1] - arrivals[skip])
    predicted = dep.plan.predicted.throughput_sps
    return {
        "plan": [
            {"layers": [s.first, s.last], "devices": [d.id for d in s.devices]}
            for s in dep.plan.stages
        ],
        "predicted_sps": predicted,
        "measured_sps": measured,
        "throughput_ratio": measured / predicted if predicted > 0 else None,
    }


async def _half_plans(fleet: LocalFleet) -> list[Plan]:
    """The planner's best plan on each half of the fleet: two plans on disjoint devices."""
    deployer = _deployer(fleet)
    profiles = {p.node_id: p for p in deployer.registry.alive()}
    ids = [NodeId(a.settings.node_id) for a in fleet.agents]
    plans = []
    for half in (ids[:2], ids[2:]):
        plan_set, _ = await deployer.plan_set(
            MODEL,
            QoESpec(objective="max_throughput"),
            Workload(),
            "doramesh",
            60.0,
            max_plans=1,
            devices=[profiles[i] for i in half],
        )
        plans.append(plan_set.plans[0])
    return plans


def _first_reweight_after(deployer: Deployer, at: float, word: str) -> float | None:
    live = deployer.live.get(MODEL)
    if live is None:
        return None
    times = [r.at for r in live.reweights if r.at >= at and word in r.reason]
    return min(times) - at if times else None


def _first_shift_after(deployer: Deployer, at: float, epoch: int, below: float) -> float | None:
    """Seconds from ``at`` to the first re-weight that put ``epoch``'s share under ``below``."""
    live = deployer.live.get(MODEL)
    if live is None:
        return None
    times = [r.at for r in live.reweights if r.at >= at and r.shares.get(epoch, 1.0) < below]
    return min(times) - at if times else None


async def _events(
    fleet: LocalFleet, client: AsyncClient, plans: list[Plan], n: int
) -> dict[str, Any]:
    """Phase 2: two plans live; slow one agent 3x, restore it, kill another; count answers."""
    deployer = _deployer(fleet)
    await client.deploy(MODEL, seed=2, plans=plans)
    live = deployer.live[MODEL]
    epoch_a, epoch_b = list(live.plans)
    # The slowed agent: the first plan's busiest device; the killed one: the second plan's.
    slow_id = max(
        live.loads[epoch_a].device_seconds, key=lambda d: live.loads[epoch_a].device_seconds[d]
    )
    kill_id = max(
        live.loads[epoch_b].device_seconds, key=lambda d: live.loads[epoch_b].device_seconds[d]
    )
    index = {a.settings.node_id: i for i, a in enumerate(fleet.agents)}
    slow_runtime = fleet.agents[index[slow_id]].runtime
    assert slow_runtime is not None
    share_before = live.shares[epoch_a]

    reference = models.build_blocks(MODEL, 2)
    inputs = [models.example_input(MODEL, 1, seed=i, sample_shape=EVENT_SHAPE) for i in range(n)]
    results: list[Any] = []
    failures: list[str] = []
    marks: dict[str, float] = {}
    restored_at_result: int | None = None
    killer: asyncio.Task[None] | None = None

    def on_result() -> None:
        nonlocal restored_at_result, killer
        now = time.monotonic()
        if len(results) == n // 6:
            slow_runtime.pacer.slowdown = SLOWDOWN
            marks["slowed"] = now
        if (
            "slowed" in marks
            and restored_at_result is None
            and (
                _first_shift_after(deployer, marks["slowed"], epoch_a, SHIFTED * share_before)
                is not None
                or len(results) >= n // 2
            )
        ):
            marks["shifted"] = now
            slow_runtime.pacer.slowdown = 1.0
            restored_at_result = len(results)
        if (
            restored_at_result is not None
            and killer is None
            and len(results) >= max(restored_at_result + n // 10, (2 * n) // 3)
        ):
            marks["killed"] = now
            killer = asyncio.create_task(fleet.kill_agent(index[kill_id]))

    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            try:
                result = await client.infer_result(MODEL, inputs[i], request_id=str(i), timeout=300)
            except DoraMeshError as err:
                failures.append(f"{i}: {err}")
                continue
            results.append(result)
            on_result()

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    if killer is not None:
        await killer
    share_slowed = min(
        (r.shares.get(epoch_a, 1.0) for r in live.reweights if r.at >= marks.get("slowed", 0)),
        default=share_before,
    )
    # The background re-planning after the kill.
    replan_s: float | None = None
    try:
        await wait_for_async(lambda: bool(deployer.live[MODEL].replan_live_s), timeout=60)
        replan_s = deployer.live[MODEL].replan_live_s[-1]
    except TimeoutError:
        pass
    ids = Counter(r.request_id for r in results)
    wrong = 0
    with torch.inference_mode():
        for r in results:
            x = inputs[int(r.request_id)]
            if (r.output - reference(x)).abs().max().item() > TOLERANCE:
                wrong += 1
    status = await client.job_status(MODEL)
    slowdown_ms = _first_shift_after(deployer, marks["slowed"], epoch_a, SHIFTED * share_before)
    kill_ms = (
        _first_reweight_after(deployer, marks["killed"], "died") if "killed" in marks else None
    )
    return {
        "plans": [[[s.first, s.last, [d.id for d in s.devices]] for s in p.stages] for p in plans],
        "slowed_agent": slow_id,
        "killed_agent": kill_id,
        "share_of_slowed_plan": {"before": share_before, "slowed": share_slowed},
        "adapter_reweight_ms": {
            "kill": None if kill_ms is None else kill_ms * 1e3,
            "slowdown": None if slowdown_ms is None else slowdown_ms * 1e3,
        },
        "replan_live_s": replan_s,
        "requests": n,
        "answered": len(ids),
        "lost_requests": n - len(ids),
        "duplicate_results": sum(c - 1 for c in ids.values()),
        "wrong_results": wrong,
        "failures": failures[:10],
        "replayed_requests": status.requests_replayed,
        "reweights": len(live.reweights),
        "plan_epochs_used": len({r.plan_epoch for r in results}),
    }


def _train_locally(seed: int) -> dict[str, torch.Tensor]:
    import torch.nn.functional as F

    from doramesh.training import SyntheticData

    model = models.build_blocks(MODEL, seed)
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN_LR, momentum=TRAIN_MOMENTUM)
    data = SyntheticData.for_model(MODEL, seed, TRAIN_BATCH, TRAIN_SHAPE)
    for step in range(1, TRAIN_STEPS + 1):
        x, y = data.step(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


async def _training(fleet: LocalFleet, client: AsyncClient, seed: int = 3) -> dict[str, Any]:
    """Phase 3: a pipeline over three live agents with a 2-replica middle stage."""
    from safetensors.torch import load_file

    from doramesh.training import OptimizerSpec

    deployer = _deployer(fleet)
    ids = [p.node_id for p in deployer.registry.alive()][:3]
    n = models.get_spec(MODEL).num_blocks
    a, b = n // 3 - 1, n - n // 3 - 1
    plan = Plan(
        plan_id=PlanId("bench-training"),
        stages=(
            StagePlan(0, a, (DeviceShare(ids[0], 1.0),)),
            StagePlan(a + 1, b, (DeviceShare(ids[1], 0.5), DeviceShare(ids[2], 0.5))),
            StagePlan(b + 1, n - 1, (DeviceShare(ids[0], 1.0),)),
        ),
        microbatch=1,
        flows=(),
        predicted=Prediction(0.0, 0.0, 0.0),
    )
    progress = [
        p
        async for p in client.train(
            MODEL,
            steps=TRAIN_STEPS,
            batch=TRAIN_BATCH,
            microbatches=2,
            optimizer=OptimizerSpec("sgd", lr=TRAIN_LR, momentum=TRAIN_MOMENTUM),
            seed=seed,
            data_seed=seed,
            sample_shape=TRAIN_SHAPE,
            plan=plan,
            checkpoint_every=TRAIN_STEPS,
            timeout=600,
        )
    ]
    tag = progress[-1].checkpoint
    params: dict[str, torch.Tensor] = {}
    for agent in fleet.agents:
        if agent.runtime is None:
            continue
        for path in sorted((agent.runtime.checkpoints.root / tag).glob("*.safetensors")):
            for key, value in load_file(str(path)).items():
                if key.startswith("model."):
                    params[key.removeprefix("model.")] = value
    local = _train_locally(seed)
    diffs = [
        ((params[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-12)).item()
        for k, v in local.items()
        if v.is_floating_point() and k in params
    ]
    missing = [k for k, v in local.items() if v.is_floating_point() and k not in params]
    return {
        "steps": TRAIN_STEPS,
        "stages": [[s.first, s.last, [d.id for d in s.devices]] for s in plan.stages],
        "step_ms_mean": statistics.mean(p.step_ms for p in progress),
        "training_max_rel_param_diff": max(diffs) if diffs and not missing else None,
        "missing_params": len(missing),
    }


async def run_runtime_bench(
    *, requests: int = 200, throughput_requests: int = 40
) -> dict[str, Any]:
    started = time.perf_counter()
    async with LocalFleet(classes=CLASSES, mdns=False) as fleet:
        async with AsyncClient(fleet.address, timeout=600) as client:
            plans = await _half_plans(fleet)
            throughput = await _throughput(client, plans[0], throughput_requests)
            events = await _events(fleet, client, plans, requests)
            training = await _training(fleet, client)
    return {
        "model": MODEL,
        "fleet": list(CLASSES),
        "throughput_ratio": throughput["throughput_ratio"],
        "throughput": throughput,
        "adapter_reweight_ms": events.pop("adapter_reweight_ms"),
        "replan_live_s": events.pop("replan_live_s"),
        "requests": events.pop("requests"),
        "lost_requests": events.pop("lost_requests"),
        "duplicate_results": events.pop("duplicate_results"),
        "training_max_rel_param_diff": training["training_max_rel_param_diff"],
        "events": events,
        "training": training,
        "hysteresis": (
            "a device speed is accepted after 3 consecutive polls off by >25%; shares move only "
            "if the LP objective improves by >5%; a dead agent re-weights at once"
        ),
        "seconds": time.perf_counter() - started,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"doramesh bench runtime ({report['model']}, {len(report['fleet'])} agents)"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("note")
    t = report["throughput"]
    table.add_row(
        "throughput_ratio",
        _fmt(report["throughput_ratio"]),
        f"measured {_fmt(t['measured_sps'])} / predicted {_fmt(t['predicted_sps'])} samples/s",
    )
    ms = report["adapter_reweight_ms"]
    ev = report["events"]
    shares = ev["share_of_slowed_plan"]
    table.add_row(
        "adapter_reweight_ms.slowdown",
        _fmt(ms["slowdown"]),
        f"{ev['slowed_agent']} slowed {SLOWDOWN:g}x; share "
        f"{_fmt(shares['before'])} -> {_fmt(shares['slowed'])}",
    )
    table.add_row("adapter_reweight_ms.kill", _fmt(ms["kill"]), f"{ev['killed_agent']} killed")
    table.add_row("replan_live_s", _fmt(report["replan_live_s"]), "kill -> new plans live")
    table.add_row(
        "requests", _fmt(report["requests"]), f"{ev['plan_epochs_used']} plan epochs used"
    )
    table.add_row(
        "lost_requests", _fmt(report["lost_requests"]), f"{ev['replayed_requests']} replayed"
    )
    table.add_row("duplicate_results", _fmt(report["duplicate_results"]), "")
    table.add_row("wrong_results", _fmt(ev["wrong_results"]), f"vs local, tolerance {TOLERANCE:g}")
    table.add_row(
        "training_max_rel_param_diff",
        _fmt(report["training_max_rel_param_diff"]),
        f"{report['training']['steps']} steps, 3 agents, 2-replica stage",
    )
    Console().print(table)


def main(json_out: str | None, *, requests: int = 200) -> int:
    report = asyncio.run(run_runtime_bench(requests=requests))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    ok = report["lost_requests"] == 0 and report["duplicate_results"] == 0
    return 0 if ok else 1


def add_bench_runtime_parser(bench_sub: Any) -> None:
    runtime = bench_sub.add_parser(
        "runtime",
        help="throughput vs prediction, adapter re-weighting, live re-planning, training check",
    )
    runtime.add_argument(
        "--json",
        dest="json_out",
        default=None,
        metavar="OUT",
        help="write the results as JSON to this file",
    )
    runtime.add_argument(
        "--requests",
        type=int,
        default=200,
        help="requests in the stream that sees the events (default 200)",
    )
