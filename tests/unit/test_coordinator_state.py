"""The coordinator's state file: a round trip keeps every field, a write is atomic, a corrupt or
oversized file is set aside (never trusted), and what is kept is bounded."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from doramesh.coordinator import state as st
from doramesh.coordinator.training import CheckpointRecord
from doramesh.training import OptimizerSpec
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


def _plan() -> Plan:
    return Plan(
        plan_id=PlanId("p"),
        stages=(
            StagePlan(0, 4, (DeviceShare(NodeId("a"), 1.0),)),
            StagePlan(5, 9, (DeviceShare(NodeId("b"), 0.25), DeviceShare(NodeId("c"), 0.75))),
        ),
        microbatch=2,
        flows=(),
        predicted=Prediction(12.5, 3.0, 0.5),
    )


def _state() -> st.CoordinatorState:
    state = st.CoordinatorState(fleet_id="f1", agents=[NodeId("a"), NodeId("b")])
    state.deployments["resnet18"] = st.DeploymentRecord(
        model="resnet18",
        seed=11,
        qoe=QoESpec(objective="min_energy", latency_ms=800.0),
        workload=Workload(kind="inference", batch=2, rate_rps=3.0),
        planner="uniform",
        max_plans=2,
        plans=(_plan(),),
    )
    state.trainings["job"] = st.TrainingRecord(
        job_id="job",
        model="mlp-tiny",
        last_step=40,
        batch=8,
        microbatches=2,
        optimizer=OptimizerSpec("sgd", lr=0.05, momentum=0.9),
        seed=11,
        data_seed=5,
        sample_shape=(64,),
        planner="doramesh",
        checkpoint_every=4,
        dataset_batches=0,
        checkpoint="job-step4",
        step=4,
    )
    state.checkpoints["job-step4"] = CheckpointRecord("job-step4", "job", "mlp-tiny", 4, _plan())
    return state


def test_a_saved_state_loads_back_equal(tmp_path: Path) -> None:
    file = st.StateFile(tmp_path)
    assert file.load() is None
    file.save(_state())
    loaded = file.load()
    assert loaded == _state()
    # Only the state file is left: the temporary file was renamed over it.
    assert [p.name for p in tmp_path.iterdir()] == [st.STATE_FILE]


def test_a_corrupt_state_file_is_set_aside_not_trusted(tmp_path: Path) -> None:
    file = st.StateFile(tmp_path)
    file.path.write_text('{"format": 1, "deployments": [{"model": "x"}]}')
    assert file.load() is None
    assert not file.path.exists()
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 1
    file.path.write_text("not json")
    assert file.load() is None


def test_what_is_kept_is_bounded(tmp_path: Path) -> None:
    state = _state()
    record = state.deployments["resnet18"]
    data = st.state_to_json(state)
    data["deployments"] = [
        {**data["deployments"][0], "model": f"m{i}"} for i in range(st.MAX_DEPLOYMENT_RECORDS + 5)
    ]
    loaded = st.state_from_json(json.loads(json.dumps(data)))
    assert len(loaded.deployments) == st.MAX_DEPLOYMENT_RECORDS
    assert next(reversed(loaded.deployments.values())).seed == record.seed


def test_the_deploy_hook_records_what_was_asked(tmp_path: Path) -> None:
    from doramesh.coordinator.mix import LiveSet

    persistence = st.CoordinatorPersistence(tmp_path, "f1")
    live = LiveSet("resnet18", 3, QoESpec(objective="max_throughput"), Workload(), "doramesh", 1)
    persistence.deployed(live, None)
    again = st.CoordinatorPersistence(tmp_path, "f1")
    assert list(again.state.deployments) == ["resnet18"]
    assert again.state.deployments["resnet18"].plans == ()
    # A state of another fleet is not restored.
    other = st.CoordinatorPersistence(tmp_path, "f2")
    assert other.state.deployments == OrderedDict()
