"""The in-flight limit refuses at once beyond its bound and gives every slot back."""

from __future__ import annotations

import pytest

from doramesh.admission import InflightLimit
from doramesh.errors import ResourceExhausted, Status


def test_refuses_beyond_the_limit_at_once_and_frees_slots() -> None:
    limit = InflightLimit(2, "requests")
    with limit.admit(), limit.admit():
        assert limit.in_flight == 2
        with pytest.raises(ResourceExhausted) as info, limit.admit():
            pass
        assert info.value.status == Status.RESOURCE_EXHAUSTED
        assert limit.refused == 1 and limit.in_flight == 2
    assert limit.in_flight == 0
    with limit.admit():
        assert limit.in_flight == 1


def test_a_failing_request_gives_its_slot_back() -> None:
    limit = InflightLimit(1, "requests")
    with pytest.raises(ValueError), limit.admit():
        raise ValueError("boom")
    assert limit.in_flight == 0 and limit.try_acquire()
    assert not limit.try_acquire() and limit.refused == 1
    limit.release()
    with pytest.raises(RuntimeError):
        limit.release()


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        InflightLimit(0, "requests")
