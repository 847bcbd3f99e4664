"""Training pieces without sockets: the loss split, the data, a stage's passes and step, the
replica gradient sum, checkpoints."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from doramesh import models
from doramesh.agent.training import (
    CheckpointStore,
    GradientRendezvous,
    StageTrainer,
    TrainSettings,
    check_tag,
)
from doramesh.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from doramesh.training import OptimizerSpec, SyntheticData, TrainPart, part_loss
from doramesh.v1 import agent_pb2


def _trainer(
    optimizer: OptimizerSpec, first: int = 0, last: int = 3, seed: int = 1
) -> StageTrainer:
    module = models.build_blocks("mlp-tiny", seed, first, last)
    return StageTrainer.create(TrainSettings("job", optimizer), module, "mlp-tiny", first, last)


def test_parts_losses_and_gradients_add_up_to_the_full_batch_mean() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 10, requires_grad=True)
    labels = torch.randint(0, 10, (6, 5))
    full = F.cross_entropy(logits.reshape(-1, 10), labels.reshape(-1))
    (want,) = torch.autograd.grad(full, logits)
    scale = 1.0 / labels.numel()
    parts = [
        part_loss(lg, lb, scale)
        for lg, lb in zip(logits.split([4, 2]), labels.split([4, 2]), strict=True)
    ]
    total = parts[0] + parts[1]
    (got,) = torch.autograd.grad(total, logits)
    assert abs(total.item() - full.item()) < 1e-6
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-6)
    with pytest.raises(InvalidArgument, match="do not fit"):
        part_loss(logits, labels[:, :3], scale)


def test_a_part_splits_into_consecutive_parts_with_their_labels() -> None:
    part = TrainPart("j", 3, 1, 10, 0.125, torch.arange(8))
    halves = part.split([5, 3])
    assert [p.offset for p in halves] == [10, 15]
    assert [p.labels.tolist() for p in halves] == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert all(p.step == 3 and p.microbatch == 1 and p.loss_scale == 0.125 for p in halves)
    back = TrainPart.from_pb(halves[1].to_pb(), batch=3)
    assert back.offset == 15 and torch.equal(back.labels, halves[1].labels)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda pb: pb.ClearField("labels"), "no labels"),
        (lambda pb: setattr(pb, "loss_scale", 2.0), "loss_scale"),
        (lambda pb: setattr(pb, "step", 0), "numbered from 1"),
        (lambda pb: pb.labels.meta.shape.__setitem__(0, 3), "byte_length"),
    ],
)
def test_malformed_parts_are_refused(mutate: object, message: str) -> None:
    pb = TrainPart("j", 1, 0, 0, 0.5, torch.arange(2)).to_pb()
    assert callable(mutate)
    mutate(pb)
    with pytest.raises(InvalidArgument, match=message):
        TrainPart.from_pb(pb, batch=2)


def test_labels_must_match_the_part() -> None:
    pb = TrainPart("j", 1, 0, 0, 0.5, torch.arange(2)).to_pb()
    with pytest.raises(InvalidArgument, match="do not match"):
        TrainPart.from_pb(pb, batch=3)
    floats = TrainPart("j", 1, 0, 0, 0.5, torch.zeros(2)).to_pb()
    with pytest.raises(InvalidArgument, match="int64"):
        TrainPart.from_pb(floats, batch=2)


def test_synthetic_data_is_deterministic_and_cycles() -> None:
    data = SyntheticData.for_model("mlp-tiny", 7, 4, distinct_batches=3)
    x1, y1 = data.step(1)
    assert x1.shape == (4, 64) and y1.shape == (4,) and y1.dtype == torch.int64
    assert int(y1.max()) < 10
    assert torch.equal(data.step(4)[0], x1) and torch.equal(data.step(4)[1], y1)
    assert not torch.equal(data.step(2)[0], x1)
    fresh = SyntheticData.for_model("mlp-tiny", 7, 4)
    assert torch.equal(fresh.step(1)[0], x1) and not torch.equal(fresh.step(4)[0], x1)
    tokens = SyntheticData.for_model("gpt2-small", 1, 2, (6,))
    ids, labels = tokens.step(1)
    assert ids.shape == labels.shape == (2, 6)
    assert torch.equal(ids[:, 1:], labels[:, :-1])  # labels are the next token


@pytest.mark.parametrize(
    "optimizer",
    [OptimizerSpec("sgd", lr=0.1, momentum=0.9), OptimizerSpec("adam", lr=1e-2)],
    ids=["sgd", "adam"],
)
def test_a_stage_split_into_parts_takes_the_full_batch_step(optimizer: OptimizerSpec) -> None:
    """Two stages, two parts each, against the whole model on the whole batch: same loss,
    same weights after two steps."""
    front, back = _trainer(optimizer, 0, 1), _trainer(optimizer, 2, 3)
    whole = models.build_blocks("mlp-tiny", 1)
    opt = optimizer.build(list(whole.parameters()))
    data = SyntheticData.for_model("mlp-tiny", 3, 6)
    for step in (1, 2):
        x, y = data.step(step)
        loss = 0.0
        for xs, ys in zip(x.split([4, 2]), y.split([4, 2]), strict=True):
            leaf0, h = front.forward(xs)
            leaf1, out = back.forward(h.detach())
            grad_h, part = back.loss_backward(leaf1, out, ys, 1.0 / y.numel())
            assert front.backward(leaf0, h, grad_h).numel() == 0  # stage 0: no input gradient
            loss += part
        for t in (front, back):
            t.apply(t.flat_grads(), step)
        want = F.cross_entropy(whole(x), y)
        opt.zero_grad()
        want.backward()
        opt.step()
        assert abs(loss - want.item()) < 1e-6
    got = {**front.module.state_dict(), **back.module.state_dict()}
    for key, value in whole.state_dict().items():
        assert torch.allclose(got[key], value, rtol=1e-5, atol=1e-7), key


def test_steps_must_come_in_order() -> None:
    trainer = _trainer(OptimizerSpec())
    trainer.check_step(1)
    with pytest.raises(Aborted, match="step 1, not 2"):
        trainer.check_step(2)


async def test_rank_zero_sums_in_rank_order_and_every_rank_gets_the_sum() -> None:
    rendezvous = GradientRendezvous(3)
    parts = [[torch.full((4,), float(r + 1))] for r in range(3)]
    results = await asyncio.gather(
        *(rendezvous.contribute(5, r, parts[r], expected_step=5) for r in (2, 0, 1))
    )
    for result in results:
        assert torch.equal(result[0], torch.full((4,), 6.0))
    assert torch.equal(parts[0][0], torch.full((4,), 1.0))  # inputs untouched
    with pytest.raises(Aborted):
        await rendezvous.contribute(7, 0, parts[0], expected_step=6)
    with pytest.raises(InvalidArgument, match="rank 3"):
        await rendezvous.contribute(6, 3, parts[0], expected_step=6)


def test_flat_gradients_are_checked_against_the_stage() -> None:
    trainer = _trainer(OptimizerSpec())
    flat = trainer.flat_grads()
    assert [t.numel() for t in flat] == [n for _, n in trainer.flat_layout()]
    with pytest.raises(InvalidArgument, match="do not match"):
        trainer.apply([flat[0][:-1]], 1)


def test_checkpoint_round_trip_resumes_the_same_trajectory(tmp_path: object) -> None:
    spec = OptimizerSpec("adam", lr=1e-2)
    data = SyntheticData.for_model("mlp-tiny", 0, 4)

    def step(t: StageTrainer, n: int) -> None:
        x, y = data.step(n)
        leaf, out = t.forward(x)
        t.loss_backward(leaf, out, y, 1.0 / y.numel())
        t.apply(t.flat_grads(), n)

    a = _trainer(spec)
    step(a, 1)
    saved = a.checkpoint_bytes()
    b = _trainer(spec)
    assert b.load_checkpoint(saved) == 1
    step(a, 2)
    step(b, 2)
    for key, value in a.module.state_dict().items():
        assert torch.equal(b.module.state_dict()[key], value), key
    with pytest.raises(FailedPrecondition, match="adam"):
        _trainer(OptimizerSpec("sgd")).load_checkpoint(saved)
    with pytest.raises(FailedPrecondition, match="not"):
        _trainer(spec, 0, 1).load_checkpoint(saved)
    with pytest.raises(InvalidArgument):
        _trainer(spec).load_checkpoint(b"not a checkpoint")


def test_checkpoint_store_keeps_tags_inside_its_folder(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    store = CheckpointStore(tmp_path)
    path, digest = store.save("job-step3", "a/b:c", 0, 2, b"bytes")
    assert path.parent == tmp_path / "job-step3" and "/" not in path.name[:-12]
    assert store.load("job-step3", "a/b:c", 0, 2) == b"bytes" and len(digest) == 64
    with pytest.raises(NotFound):
        store.load("job-step4", "a/b:c", 0, 2)
    for bad in ("..", "a/b", "", "x" * 129):
        with pytest.raises(InvalidArgument):
            check_tag(bad)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (OptimizerSpec("sgd", lr=0.0), "lr"),
        (OptimizerSpec("sgd", lr=0.1, momentum=1.0), "momentum"),
        (OptimizerSpec("adam", lr=0.1, beta2=1.5), "beta2"),
        (OptimizerSpec("rmsprop", lr=0.1), "rmsprop"),  # type: ignore[arg-type]
    ],
)
def test_optimizer_specs_are_checked(spec: OptimizerSpec, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        spec.check()


def test_optimizer_spec_defaults_are_torchs() -> None:
    from doramesh.training import optimizer_from_pb

    spec = optimizer_from_pb(agent_pb2.OptimizerSpec(name="adam", lr=0.5))
    opt = spec.build([torch.nn.Parameter(torch.zeros(1))])
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["lr"] == 0.5
    assert optimizer_from_pb(agent_pb2.OptimizerSpec(lr=0.1)).name == "sgd"
