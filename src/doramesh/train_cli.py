"""``doramesh train``: train (fine-tune) a model across a coordinator's fleet, with a progress bar.

    doramesh train --coordinator 127.0.0.1:7070 --model resnet18 --steps 20 --batch 8 \\
        --optimizer sgd --lr 0.01 --momentum 0.9 --sample-shape 3,32,32 --dataset-batches 4

The data is synthetic and deterministic (``--data-seed``; see ``doramesh.training``): the job
exercises the fleet's forward, backward, gradient sync and optimizer steps, nothing is
downloaded. ``--checkpoint-every N`` has every agent save its stage every N steps and after the
last; ``--resume-from TAG`` continues a job from such a checkpoint, on the same loss curve.

The CLI itself wires this in with ``add_train_parser(subparsers)`` and ``run_train(args)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from doramesh.sdk import TrainProgress

ENV_PREFIX = "DORAMESH_"


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 3,32,32") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive sizes")
    return dims


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return value

    return parse


def add_train_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``train`` to a ``doramesh`` subcommand set; returns its parser."""
    train = subparsers.add_parser(
        "train",
        help="train a model across the fleet (synthetic data), with a progress bar",
        description="Train (fine-tune) a model across a coordinator's fleet on synthetic, "
        "deterministic data, with a progress bar of loss and step time. Checkpoints are saved by "
        "every agent (its own stage, safetensors) and a job resumes from one on the same curve.",
    )
    train.add_argument(
        "--coordinator",
        default=os.environ.get(ENV_PREFIX + "COORDINATOR") or "127.0.0.1:7070",
        help=f"host:port of the coordinator [env {ENV_PREFIX}COORDINATOR]",
    )
    train.add_argument("--model", required=True, help="zoo model (or one the daemons registered)")
    train.add_argument("--steps", type=_positive(int), required=True, help="optimizer steps")
    train.add_argument("--batch", type=_positive(int), default=8, help="samples per step (8)")
    train.add_argument(
        "--microbatches", type=_positive(int), default=2, help="microbatches per step (2)"
    )
    train.add_argument(
        "--optimizer", choices=("sgd", "adam", "adamw"), default="sgd", help="(default sgd)"
    )
    train.add_argument("--lr", type=_positive(float), default=0.01, help="learning rate (0.01)")
    train.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (0)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (0)")
    train.add_argument("--eps", type=float, default=0.0, help="Adam eps (0 = torch's 1e-8)")
    train.add_argument("--seed", type=int, default=0, help="initial weights seed (0)")
    train.add_argument("--data-seed", type=int, default=0, help="synthetic data seed (0)")
    train.add_argument(
        "--dataset-batches",
        type=int,
        default=0,
        help="cycle over N fixed batches, so the loss can fall (0 = fresh batches)",
    )
    train.add_argument(
        "--sample-shape",
        type=_shape,
        default=None,
        help="per-sample input shape, e.g. 3,32,32 or 16 (default: the model's)",
    )
    train.add_argument(
        "--plan",
        type=Path,
        default=None,
        help="a plan JSON file to train on (default: ask the planner)",
    )
    train.add_argument("--planner", default="doramesh", help="planner name (doramesh)")
    train.add_argument(
        "--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0 = never)"
    )
    train.add_argument("--resume-from", default="", help="checkpoint tag to continue from")
    train.add_argument("--job-id", default="", help="job id ([A-Za-z0-9_.-]; default: fresh)")
    train.add_argument(
        "--timeout", type=_positive(float), default=6 * 3600.0, help="job deadline, s (6 h)"
    )
    train.add_argument("--json", action="store_true", help="one JSON object per step, no bar")
    return train


def run_train(args: argparse.Namespace) -> int:
    """Run the job; 0 when every step completed, 1 on a refused or failed job, 130 on Ctrl-C."""
    from doramesh import convert
    from doramesh.errors import DoraMeshError
    from doramesh.sdk import Client
    from doramesh.training import OptimizerSpec

    plan = None
    try:
        if args.plan is not None:
            plan = convert.plan_from_json(json.loads(args.plan.read_text()))
        optimizer = OptimizerSpec(
            args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            eps=args.eps,
        ).check()
    except (OSError, json.JSONDecodeError, DoraMeshError) as err:
        print(f"doramesh train: {err}", file=sys.stderr)
        return 1
    last: TrainProgress | None = None
    checkpoints: list[str] = []
    try:
        with Client(args.coordinator, timeout=args.timeout) as client:
            steps = client.train(
                args.model,
                steps=args.steps,
                batch=args.batch,
                microbatches=args.microbatches,
                optimizer=optimizer,
                seed=args.seed,
                data_seed=args.data_seed,
                sample_shape=args.sample_shape,
                plan=plan,
                planner=args.planner,
                checkpoint_every=args.checkpoint_every,
                resume_from=args.resume_from,
                job_id=args.job_id,
                dataset_batches=args.dataset_batches,
                timeout=args.timeout,
            )
            if args.json:
                for p in steps:
                    last = p
                    print(json.dumps(_record(p, with_plan=p.step == p.resumed_from + 1)))
                    sys.stdout.flush()
            else:
                last, checkpoints = _with_progress_bar(steps, args)
    except DoraMeshError as err:
        print(f"doramesh train: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("doramesh train: interrupted; the job was cancelled", file=sys.stderr)
        return 130
    if last is not None and not args.json:
        _summary(last, checkpoints)
    return 0


def _record(p: TrainProgress, *, with_plan: bool) -> dict[str, Any]:
    from doramesh import convert

    record = {
        "job_id": p.job_id,
        "step": p.step,
        "last_step": p.last_step,
        "loss": p.loss,
        "step_ms": p.step_ms,
        "samples_per_s": p.samples_per_s,
        "plan_epoch": p.plan_epoch,
        "checkpoint": p.checkpoint,
    }
    if with_plan:
        record["plan"] = convert.plan_to_json(p.plan)
    return record


def _with_progress_bar(
    steps: Iterator[TrainProgress], args: argparse.Namespace
) -> tuple[TrainProgress | None, list[str]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    last: TrainProgress | None = None
    checkpoints: list[str] = []
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[step_ms]} ms/step"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"deploying {args.model}", total=args.steps, loss="-", step_ms="-")
        for p in steps:
            if last is None:
                stages = " | ".join(
                    f"{s.first}-{s.last}@" + "+".join(d.id for d in s.devices)
                    for s in p.plan.stages
                )
                console.print(f"plan epoch {p.plan_epoch}: {stages}")
                if p.resumed_from:
                    console.print(f"resumed from step {p.resumed_from}")
            last = p
            if p.checkpoint:
                checkpoints.append(p.checkpoint)
            progress.update(
                task,
                description=f"{args.model} step {p.step}/{p.last_step}",
                advance=1,
                loss=f"{p.loss:.4f}",
                step_ms=f"{p.step_ms:.0f}",
            )
    return last, checkpoints


def _summary(last: TrainProgress, checkpoints: list[str]) -> None:
    print(
        f"job {last.job_id}: step {last.step}/{last.last_step}, loss {last.loss:.6f}, "
        f"{last.step_ms:.0f} ms/step, {last.samples_per_s:.1f} samples/s"
    )
    if checkpoints:
        print(f"checkpoints: {', '.join(checkpoints)} (resume with --resume-from TAG)")
