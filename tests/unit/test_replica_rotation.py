"""A data-parallel stage's replicas share its samples over many microbatches, batch 1 included."""

from __future__ import annotations

import pytest

from doramesh.streams import PeerLink, Replica, _Rotation


@pytest.fixture(autouse=True)
def _fresh_rotation() -> None:
    # groups are keyed by their links' ids, which a later test's new links may reuse
    _Rotation._groups.clear()


def _group(*shares: float) -> list[Replica]:
    return [Replica(PeerLink(f"127.0.0.1:{5000 + i}"), f"s{i}", s) for i, s in enumerate(shares)]


def test_batch_one_alternates_between_equal_replicas() -> None:
    group = _group(0.5, 0.5)
    picks = [_Rotation.counts(group, 1) for _ in range(6)]
    assert picks == [[1, 0], [0, 1]] * 3


def test_shares_hold_over_many_small_microbatches() -> None:
    group = _group(0.6, 0.3, 0.1)
    totals = [0, 0, 0]
    for batch in [1, 2, 3, 1, 1, 2] * 10:  # 100 samples
        counts = _Rotation.counts(group, batch)
        assert sum(counts) == batch
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
    assert totals == [60, 30, 10]


def test_a_large_microbatch_splits_by_share_at_once() -> None:
    assert _Rotation.counts(_group(0.75, 0.25), 8) == [6, 2]


def test_groups_keep_their_own_state() -> None:
    a, b = _group(0.5, 0.5), _group(0.5, 0.5)
    assert _Rotation.counts(a, 1) == [1, 0]
    assert _Rotation.counts(b, 1) == [1, 0]  # b's rotation did not see a's pick
    assert _Rotation.counts(a, 1) == [0, 1]


def test_empty_batch_or_no_share_sends_nothing() -> None:
    assert _Rotation.counts(_group(0.5, 0.5), 0) == [0, 0]
    assert _Rotation.counts(_group(0.0, 0.0), 3) == [0, 0]
