"""``doramesh bench load``: many concurrent clients against a fleet of real OS processes.

The planner, the coordinator and the agents run as separate processes started through the CLI
(``SubprocessFleet``: the same commands a LAN deployment runs), so the memory figures are the
daemons' own. ``--clients`` asyncio clients, each with its own gRPC channel, send unary
``Infer`` calls back to back for ``--warmup`` seconds (not counted) and then ``--seconds``
seconds (counted). Every answer is checked against the model run locally with the same seed.

Memory is sampled once a second from ``/proc/PID/status`` (VmRSS) for every daemon. "Flat"
is a stated rule, not a feeling: over the measured window, each daemon's resident memory in the
last tenth (median) exceeds that of the first tenth (median) by no more than
``5 % + 8 MiB``; allocator noise stays under that, a leak of a few KiB per request does not.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from doramesh import models
from doramesh.errors import DoraMeshError
from doramesh.sdk import AsyncClient, Client
from doramesh.testing import SubprocessFleet, wait_for

MiB = 2**20
#: Small inputs for the image models, so a 2-core box measures the mesh, not the convolutions.
SAMPLE_SHAPES: dict[str, tuple[int, ...]] = {"resnet18": (3, 64, 64), "resnet50": (3, 64, 64)}
#: How much a daemon's memory may grow over the measured window and still count as flat.
FLAT_REL = 0.05
FLAT_ABS_BYTES = 8 * MiB


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (Linux ``/proc``), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class MemoryTrace:
    name: str
    pid: int
    #: (seconds since the measured window opened, bytes); negative times are warm-up.
    samples: list[tuple[float, int]] = field(default_factory=list)

    def window(self) -> list[int]:
        return [b for t, b in self.samples if t >= 0]

    def summary(self) -> dict[str, Any]:
        measured = self.window()
        if len(measured) < 2:
            return {"name": self.name, "samples": len(measured), "flat": None}
        k = max(1, len(measured) // 10)
        start = statistics.median(measured[:k])
        end = statistics.median(measured[-k:])
        growth = end - start
        return {
            "name": self.name,
            "samples": len(measured),
            "rss_mib_after_warmup": round(start / MiB, 1),
            "rss_mib_end": round(end / MiB, 1),
            "rss_mib_peak": round(max(b for _, b in self.samples) / MiB, 1),
            "growth_mib": round(growth / MiB, 2),
            "flat": growth <= FLAT_REL * start + FLAT_ABS_BYTES,
        }


@dataclass
class LoadResult:
    model: str
    #: The deployed plan: the devices of each stage, in pipeline order.
    stages: list[list[str]]
    clients: int
    warmup_s: float
    seconds: float
    requests: int
    errors: dict[str, int]
    wrong_results: int
    rps: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    memory: list[dict[str, Any]]
    memory_flat: bool
    flat_rule: str = f"growth <= {FLAT_REL:.0%} + {FLAT_ABS_BYTES // MiB} MiB"
    host: str = field(default_factory=platform.node)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _drive(
    address: str,
    model: str,
    inputs: list[torch.Tensor],
    expected: list[torch.Tensor],
    clients: int,
    warmup_s: float,
    seconds: float,
    traces: list[MemoryTrace],
) -> tuple[list[float], dict[str, int], int, int]:
    loop = asyncio.get_running_loop()
    t0 = loop.time() + warmup_s
    stop = t0 + seconds
    latencies: list[float] = []
    errors: dict[str, int] = {}
    wrong = 0
    counted = 0

    async def one_client(index: int) -> None:
        nonlocal wrong, counted
        async with AsyncClient(address, timeout=30) as client:
            i = index
            while (now := loop.time()) < stop:
                x, want = inputs[i % len(inputs)], expected[i % len(expected)]
                i += clients
                try:
                    got = await client.infer(model, x)
                except DoraMeshError as err:
                    if now >= t0:
                        errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                if now < t0:
                    continue
                counted += 1
                latencies.append((loop.time() - now) * 1e3)
                if got.shape != want.shape or (got - want).abs().max().item() > 1e-5:
                    wrong += 1

    async def sample_memory() -> None:
        while loop.time() < stop:
            for trace in traces:
                rss = rss_bytes(trace.pid)
                if rss is not None:
                    trace.samples.append((loop.time() - t0, rss))
            await asyncio.sleep(1.0)

    await asyncio.gather(sample_memory(), *(one_client(i) for i in range(clients)))
    return latencies, errors, wrong, counted


def run_load_bench(
    *,
    clients: int = 16,
    seconds: float = 120.0,
    warmup_s: float = 20.0,
    model: str = "resnet18",
    seed: int = 0,
    workdir: Path | None = None,
    console: Console | None = None,
) -> LoadResult:
    console = console or Console()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="doramesh-load-")
        workdir = Path(tmp.name)
    fleet = SubprocessFleet(workdir=workdir)
    try:
        with console.status("starting planner, coordinator and agents as processes"):
            address = fleet.start(timeout=120)
            with Client(address, timeout=60) as client:
                wait_for(lambda: sum(a.state == "alive" for a in client.fleet()) >= 3, 30)
                dep = client.deploy(model, seed=seed, timeout=180)
        stages = [[str(d.id) for d in stage.devices] for stage in dep.plan.stages]
        reference = models.build_blocks(model, seed)
        shape = SAMPLE_SHAPES.get(model)
        inputs = [
            models.example_input(model, 1, seed=100 + i, sample_shape=shape) for i in range(8)
        ]
        with torch.inference_mode():
            expected = [reference(x) for x in inputs]
        traces = [MemoryTrace(d.name, d.process.pid) for d in fleet.daemons.values()]
        with console.status(
            f"{clients} clients: {warmup_s:.0f} s warm-up, then {seconds:.0f} s measured"
        ):
            latencies, errors, wrong, counted = asyncio.run(
                _drive(address, model, inputs, expected, clients, warmup_s, seconds, traces)
            )
    finally:
        fleet.stop()
        if tmp is not None:
            tmp.cleanup()
    memory = [t.summary() for t in traces]
    return LoadResult(
        model=model,
        stages=stages,
        clients=clients,
        warmup_s=warmup_s,
        seconds=seconds,
        requests=counted,
        errors=errors,
        wrong_results=wrong,
        rps=counted / seconds if seconds else 0.0,
        latency_ms_p50=round(_percentile(latencies, 0.50), 2),
        latency_ms_p95=round(_percentile(latencies, 0.95), 2),
        latency_ms_p99=round(_percentile(latencies, 0.99), 2),
        memory=memory,
        memory_flat=all(m["flat"] is not False for m in memory),
    )


def print_result(result: LoadResult, console: Console) -> None:
    head = Table(title=f"doramesh bench load — {result.model}, {result.clients} clients")
    for col in ("requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "wrong"):
        head.add_column(col, justify="right")
    head.add_row(
        str(result.requests),
        f"{result.rps:.1f}",
        f"{result.latency_ms_p50:.1f}",
        f"{result.latency_ms_p95:.1f}",
        f"{result.latency_ms_p99:.1f}",
        str(sum(result.errors.values())),
        str(result.wrong_results),
    )
    console.print(head)
    console.print("plan: " + " -> ".join("+".join(devices) for devices in result.stages))
    mem = Table(title=f"resident memory per daemon (flat: {result.flat_rule})")
    for col in ("daemon", "after warm-up MiB", "end MiB", "peak MiB", "growth MiB", "flat"):
        mem.add_column(col, justify="right")
    for m in result.memory:
        mem.add_row(
            m["name"],
            str(m.get("rss_mib_after_warmup", "-")),
            str(m.get("rss_mib_end", "-")),
            str(m.get("rss_mib_peak", "-")),
            str(m.get("growth_mib", "-")),
            str(m["flat"]),
        )
    console.print(mem)


def main(
    json_out: str | None = None,
    *,
    clients: int = 16,
    seconds: float = 120.0,
    warmup_s: float = 20.0,
    model: str = "resnet18",
) -> int:
    console = Console()
    start = time.monotonic()
    result = run_load_bench(
        clients=clients, seconds=seconds, warmup_s=warmup_s, model=model, console=console
    )
    print_result(result, console)
    console.print(f"[dim]{time.monotonic() - start:.0f} s in all, pid {os.getpid()}[/dim]")
    if json_out:
        Path(json_out).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    ok = result.memory_flat and not result.wrong_results and not result.errors
    return 0 if ok else 1


__all__ = ["LoadResult", "MemoryTrace", "main", "rss_bytes", "run_load_bench"]
