"""``doramesh demo``: an embedded fleet on loopback running real models split across agents.

Planner, coordinator and N agents (each emulating a different catalogue device) start in this
process as real gRPC servers; the coordinator finds the agents by mDNS on 127.0.0.1, asks the
planner for a plan, deploys the stages (weights fetched by the agents as safetensors), and runs
inference requests through the pipeline. Every output is compared with the same model run
locally in one piece, same seed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import torch

from doramesh import models
from doramesh.sdk import AsyncClient
from doramesh.testing.fleet import DEFAULT_CLASSES, LocalFleet
from doramesh.types import QoESpec, Workload

DEFAULT_MODELS = ("gpt2-small", "resnet18")
#: float32 tolerance for distributed vs local outputs: the same kernels run on the same inputs,
#: so the only differences are from thread scheduling inside BLAS reductions.
TOLERANCE = 1e-5


def _classes(n: int) -> list[str]:
    return [DEFAULT_CLASSES[i % len(DEFAULT_CLASSES)] for i in range(n)]


async def _run_model(
    client: AsyncClient, model: str, *, requests: int, seed: int
) -> dict[str, Any]:
    deployment = await client.deploy(
        model,
        seed=seed,
        qoe=QoESpec(objective="max_throughput"),
        workload=Workload(kind="inference", batch=1),
        timeout=600,
    )
    reference = models.build_blocks(model, seed)
    latencies: list[float] = []
    max_diff = 0.0
    for i in range(requests):
        x = models.example_input(model, 1, seed=seed + i)
        result = await client.infer_result(model, x, timeout=300)
        latencies.append(result.latency_ms)
        with torch.inference_mode():
            expected = reference(x)
        max_diff = max(max_diff, (result.output - expected).abs().max().item())
    status = await client.job_status(model)
    plan = deployment.plan
    return {
        "model": model,
        "plan_epoch": deployment.plan_epoch,
        "stages": [
            {"layers": [s.first, s.last], "devices": [d.id for d in s.devices]} for s in plan.stages
        ],
        "predicted": {
            "latency_ms": plan.predicted.latency_ms,
            "throughput_sps": plan.predicted.throughput_sps,
            "energy_j_per_sample": plan.predicted.energy_j_per_sample,
        },
        "requests": requests,
        "max_abs_diff": max_diff,
        "tolerance": TOLERANCE,
        "matches_local": max_diff <= TOLERANCE,
        "latency_ms_p50": statistics.median(latencies),
        "latency_ms_p95": status.latency_ms_p95,
    }


TRAIN_MODEL = "resnet18"
TRAIN_SHAPE = (3, 32, 32)
TRAIN_STEPS = 5
TRAIN_BATCH = 8
TRAIN_LR = 0.01
TRAIN_MOMENTUM = 0.9
#: Per-step loss tolerance of distributed vs single-process training (float32).
TRAIN_TOLERANCE = 1e-5


def _train_locally(seed: int) -> list[float]:
    """The same job in one process, plain torch: the reference the fleet must match."""
    import torch.nn.functional as F

    from doramesh.training import SyntheticData

    model = models.build_blocks(TRAIN_MODEL, seed)  # eval mode: frozen BN statistics
    opt = torch.optim.SGD(model.parameters(), lr=TRAIN_LR, momentum=TRAIN_MOMENTUM)
    data = SyntheticData.for_model(TRAIN_MODEL, seed, TRAIN_BATCH, TRAIN_SHAPE)
    losses = []
    for step in range(1, TRAIN_STEPS + 1):
        x, y = data.step(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(loss.item())
    return losses


async def _run_training(client: AsyncClient, seed: int) -> dict[str, Any]:
    from doramesh.training import OptimizerSpec

    progress = [
        p
        async for p in client.train(
            TRAIN_MODEL,
            steps=TRAIN_STEPS,
            batch=TRAIN_BATCH,
            microbatches=2,
            optimizer=OptimizerSpec("sgd", lr=TRAIN_LR, momentum=TRAIN_MOMENTUM),
            seed=seed,
            data_seed=seed,
            sample_shape=TRAIN_SHAPE,
            qoe=QoESpec(objective="min_latency"),
            timeout=600,
        )
    ]
    local = _train_locally(seed)
    diff = max(abs(p.loss - ref) for p, ref in zip(progress, local, strict=True))
    plan = progress[-1].plan
    return {
        "model": TRAIN_MODEL,
        "sample_shape": list(TRAIN_SHAPE),
        "steps": TRAIN_STEPS,
        "batch": TRAIN_BATCH,
        "stages": [
            {"layers": [s.first, s.last], "devices": [d.id for d in s.devices]} for s in plan.stages
        ],
        "losses": [p.loss for p in progress],
        "local_losses": local,
        "max_loss_diff": diff,
        "tolerance": TRAIN_TOLERANCE,
        "matches_local": diff <= TRAIN_TOLERANCE,
        "step_ms_mean": statistics.mean(p.step_ms for p in progress),
    }


async def demo(
    n_agents: int,
    model_names: list[str],
    requests: int,
    seed: int,
    *,
    train: bool = True,
    secure: bool = True,
) -> dict[str, Any]:
    for name in model_names:
        models.get_spec(name)
    start = time.perf_counter()
    if not secure:
        from doramesh.fleet_cli import warn_insecure

        warn_insecure("demo", echo=True)
    async with LocalFleet(classes=_classes(n_agents), secure=secure) as fleet:
        discovered_s = time.perf_counter() - start
        async with AsyncClient(fleet.address, timeout=60) as client:
            agents = await client.fleet()
            results = [
                await _run_model(client, name, requests=requests, seed=seed) for name in model_names
            ]
            training = await _run_training(client, seed) if train else None
    return {
        "agents": [
            {
                "id": a.profile.node_id,
                "class": a.profile.device_class,
                "address": a.profile.address,
                "gflops": round(a.profile.gflops, 2),
                "memory_mb": a.profile.memory_bytes >> 20,
                "discovered_by": a.discovered_by,
            }
            for a in agents
        ],
        "fleet_ready_s": round(discovered_s, 2),
        # Every connection in the demo is mutual TLS under an ephemeral fleet CA.
        "security": "mtls" if secure else "insecure",
        "inference": results,
        "training": training,
        "ok": all(r["matches_local"] for r in results)
        and (training is None or training["matches_local"]),
    }


def _print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    agents = Table(
        title=f"fleet: {len(report['agents'])} agents found by mDNS in {report['fleet_ready_s']} s"
    )
    for col in ("agent", "emulates", "GFLOP/s", "memory MiB", "found by"):
        agents.add_column(col)
    for a in report["agents"]:
        agents.add_row(
            a["id"], a["class"], f"{a['gflops']:.1f}", str(a["memory_mb"]), a["discovered_by"]
        )
    console.print(agents)
    runs = Table(title="distributed inference vs local execution (float32, same seed)")
    runs.add_column("model")
    runs.add_column("stages: layers -> agent", no_wrap=True)
    for col in ("p50 ms", "predicted ms", "max |diff|", "match"):
        runs.add_column(col, justify="right")
    for r in report["inference"]:
        stages = "\n".join(
            f"[{s['layers'][0]}-{s['layers'][1]}] -> {', '.join(s['devices'])}" for s in r["stages"]
        )
        runs.add_row(
            r["model"],
            stages,
            f"{r['latency_ms_p50']:.1f}",
            f"{r['predicted']['latency_ms']:.1f}",
            f"{r['max_abs_diff']:.2e}",
            "yes" if r["matches_local"] else "NO",
        )
    console.print(runs)
    t = report.get("training")
    if t:
        train = Table(
            title=f"distributed training vs one process: {t['model']} "
            f"{'x'.join(map(str, t['sample_shape']))}, batch {t['batch']}, SGD"
        )
        train.add_column("stages: layers -> agent", no_wrap=True)
        for col in ("step", "loss (fleet)", "loss (local)", "|diff|"):
            train.add_column(col, justify="right")
        stages = "\n".join(
            f"[{s['layers'][0]}-{s['layers'][1]}] -> {', '.join(s['devices'])}" for s in t["stages"]
        )
        for i, (a, b) in enumerate(zip(t["losses"], t["local_losses"], strict=True)):
            train.add_row(
                stages if i == 0 else "", str(i + 1), f"{a:.6f}", f"{b:.6f}", f"{abs(a - b):.1e}"
            )
        console.print(train)


def run_demo(args: argparse.Namespace) -> int:
    model_names = list(args.model or DEFAULT_MODELS)
    if args.agents < 1:
        print("doramesh demo: --agents must be at least 1", file=sys.stderr)
        return 2
    report = asyncio.run(
        demo(
            args.agents,
            model_names,
            args.requests,
            args.seed,
            train=not args.no_train,
            secure=not getattr(args, "insecure", False),
        )
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_tables(report)
    return 0 if report["ok"] else 1
