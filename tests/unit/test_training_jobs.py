"""A training job's request is checked before any stage is loaded."""

from __future__ import annotations

from typing import Any

import pytest

from doramesh.coordinator.training import TrainingJobs, TrainJob
from doramesh.errors import InvalidArgument, NotFound
from doramesh.training import OptimizerSpec


class _NoDeployer:
    """Any use of it fails the test: every refusal below must come before deployment."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the job reached the deployer ({name})")


async def _first_report(job: TrainJob) -> None:
    jobs = TrainingJobs(_NoDeployer())  # type: ignore[arg-type]
    await anext(jobs.run(job, timeout_s=10))


@pytest.mark.parametrize(
    ("job", "error", "message"),
    [
        (TrainJob("mlp-tiny", steps=0), InvalidArgument, "steps"),
        (TrainJob("mlp-tiny", steps=1, batch=0), InvalidArgument, "batch"),
        (TrainJob("mlp-tiny", steps=1, batch=2, microbatches=3), InvalidArgument, "microbatches"),
        (TrainJob("mlp-tiny", steps=1, optimizer=OptimizerSpec(lr=-1)), InvalidArgument, "lr"),
        (TrainJob("mlp-tiny", steps=1, sample_shape=(3, 4)), InvalidArgument, "sample shape"),
        (TrainJob("mlp-tiny", steps=1, job_id="a b"), InvalidArgument, "job_id"),
        (TrainJob("mlp-tiny", steps=1, resume_from="../x"), InvalidArgument, "resume_from"),
        (TrainJob("mlp-tiny", steps=1, checkpoint_every=-1), InvalidArgument, "checkpoint"),
        (TrainJob("no-such-model", steps=1), NotFound, "no-such-model"),
        (
            TrainJob("gpt2-small", steps=1, batch=1 << 16, sample_shape=(16,)),
            InvalidArgument,
            "more microbatches",
        ),
    ],
)
async def test_bad_jobs_are_refused_before_deployment(
    job: TrainJob, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await _first_report(job)


def test_a_job_gets_an_id() -> None:
    job = TrainJob("mlp-tiny", steps=3).check()
    assert job.job_id and job.steps == 3
    assert TrainJob("mlp-tiny", steps=3, job_id="mine").check().job_id == "mine"
