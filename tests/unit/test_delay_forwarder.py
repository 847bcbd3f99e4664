"""The delay forwarder's release-time logic, without namespaces or sockets."""

from __future__ import annotations

import random

import pytest

from doramesh.testing.delay import DelayLine, DelaySpec


def test_a_constant_delay_releases_each_frame_exactly_that_late() -> None:
    line = DelayLine(DelaySpec(5.0), random.Random(0))
    for i in range(10):
        assert line.push(i * 0.001, b"f%d" % i)
    assert line.next_release() == pytest.approx(0.005)
    assert list(line.pop_due(0.0049)) == []
    assert list(line.pop_due(0.0051)) == [b"f0"]
    assert list(line.pop_due(0.0085)) == [b"f1", b"f2", b"f3"]
    assert len(line) == 6


def test_jitter_spreads_the_delay_but_never_reorders() -> None:
    line = DelayLine(DelaySpec(10.0, jitter_ms=8.0), random.Random(1))
    arrivals = [i * 0.0005 for i in range(2000)]  # 2 kHz, faster than the jitter's spread
    releases = [line.release_time(t) for t in arrivals]
    assert releases == sorted(releases)
    waits = [r - t for r, t in zip(releases, arrivals, strict=True)]
    assert min(waits) >= 0.002 - 1e-9  # delay - jitter
    assert max(waits) - min(waits) > 0.008  # a real spread, not a constant


def test_sparse_frames_see_the_whole_jitter_range_around_the_delay() -> None:
    line = DelayLine(DelaySpec(10.0, jitter_ms=4.0), random.Random(2))
    waits = [line.release_time(t) - t for t in (i * 1.0 for i in range(2000))]
    assert 0.006 - 1e-9 <= min(waits) < 0.0065
    assert 0.0135 < max(waits) <= 0.014 + 1e-9
    assert sum(waits) / len(waits) == pytest.approx(0.010, abs=0.0003)


def test_jitter_larger_than_the_delay_never_releases_before_arrival() -> None:
    line = DelayLine(DelaySpec(1.0, jitter_ms=5.0), random.Random(3))
    for i in range(1000):
        now = i * 0.01
        assert line.release_time(now) >= now


def test_the_line_is_bounded_in_bytes_and_counts_what_it_drops() -> None:
    line = DelayLine(DelaySpec(50.0), random.Random(0), max_bytes=3000)
    assert line.push(0.0, b"x" * 1500)
    assert line.push(0.0, b"x" * 1500)
    assert not line.push(0.0, b"x" * 1500)
    assert line.dropped == 1
    assert list(line.pop_due(1.0)) == [b"x" * 1500] * 2
    assert line.push(1.0, b"x" * 1500)  # room again once frames left


def test_negative_delays_are_refused() -> None:
    with pytest.raises(ValueError):
        DelaySpec(-1.0)
    with pytest.raises(ValueError):
        DelaySpec(1.0, jitter_ms=-0.5)
