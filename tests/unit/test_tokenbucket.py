"""TokenBucket: rate, burst, debt for big chunks, live rate changes, fairness; one real-time run."""

from __future__ import annotations

import asyncio
import time

import pytest

from doramesh.tokenbucket import TokenBucket


class AutoTime:
    """A fake clock whose sleep advances it at once: time passes only when the bucket waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class ManualTime:
    """A fake clock the test advances; sleepers wake when their deadline has passed."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._timers.append((self.now + seconds, fut))
        await fut

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, fut in self._timers:
            if deadline <= self.now + 1e-12 and not fut.done():
                fut.set_result(None)
        await settle()


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(20):
        await asyncio.sleep(0)


def auto_bucket(rate: float | None, burst: float) -> tuple[TokenBucket, AutoTime]:
    t = AutoTime()
    return TokenBucket(rate, burst, clock=t.clock, sleep=t.sleep), t


async def test_a_full_bucket_sends_its_burst_at_once() -> None:
    bucket, t = auto_bucket(1000, 500)
    assert await bucket.acquire(300) == 0.0
    assert await bucket.acquire(200) == 0.0
    assert t.sleeps == []
    assert bucket.tokens == pytest.approx(0.0)


async def test_after_the_burst_chunks_go_out_at_the_rate() -> None:
    bucket, t = auto_bucket(1000, 100)
    waited = [await bucket.acquire(100) for _ in range(10)]
    assert waited[0] == 0.0
    assert waited[1:] == pytest.approx([0.1] * 9)
    assert t.now == pytest.approx(0.9)  # 1000 bytes, 100 free, 900 at 1000 B/s


async def test_tokens_refill_with_time_up_to_the_burst() -> None:
    bucket, t = auto_bucket(1000, 100)
    await bucket.acquire(100)
    t.now += 0.05
    assert bucket.tokens == pytest.approx(50)
    t.now += 10
    assert bucket.tokens == pytest.approx(100)  # never more than the burst


async def test_a_chunk_larger_than_the_burst_passes_as_debt() -> None:
    bucket, t = auto_bucket(1000, 100)
    # A full bucket lets a 1000-byte chunk through at once rather than waiting forever...
    assert await bucket.acquire(1000) == 0.0
    assert bucket.tokens == pytest.approx(-900)
    # ...and the next chunk pays the debt back: the long-run rate is still 1000 B/s.
    assert await bucket.acquire(100) == pytest.approx(1.0)
    assert t.now == pytest.approx(1.0)


async def test_a_big_chunk_waits_only_for_a_full_bucket() -> None:
    bucket, _ = auto_bucket(1000, 100)
    await bucket.acquire(100)
    assert await bucket.acquire(5000) == pytest.approx(0.1)
    assert bucket.tokens == pytest.approx(-4900)


@pytest.mark.parametrize("rate", [None, 0])
async def test_rate_none_or_zero_is_unlimited(rate: float | None) -> None:
    bucket, t = auto_bucket(rate, 10)
    for _ in range(100):
        assert await bucket.acquire(1 << 20) == 0.0
    assert t.sleeps == []
    assert bucket.unlimited


async def test_zero_bytes_never_wait() -> None:
    bucket, t = auto_bucket(1, 0)
    await bucket.acquire(1)
    assert await bucket.acquire(0) == 0.0
    assert t.sleeps == []


async def test_zero_burst_paces_every_chunk() -> None:
    bucket, t = auto_bucket(100, 0)
    assert await bucket.acquire(50) == 0.0
    assert await bucket.acquire(50) == pytest.approx(0.5)
    assert t.now == pytest.approx(0.5)


async def test_set_rate_takes_effect_for_a_waiter_at_once() -> None:
    t = ManualTime()
    bucket = TokenBucket(100, 100, clock=t.clock, sleep=t.sleep)
    await bucket.acquire(100)
    waiter = asyncio.create_task(bucket.acquire(100))  # needs 1 s at 100 B/s
    await settle()
    await t.advance(0.1)  # 10 bytes earned at the old rate
    assert not waiter.done()
    bucket.set_rate(1000, 100)
    await settle()
    assert not waiter.done()
    await t.advance(0.09)  # 90 more bytes at the new rate
    assert waiter.done()
    assert waiter.result() == pytest.approx(0.19)


async def test_set_rate_to_unlimited_releases_waiters() -> None:
    t = ManualTime()
    bucket = TokenBucket(1, 10, clock=t.clock, sleep=t.sleep)
    await bucket.acquire(10)
    waiters = [asyncio.create_task(bucket.acquire(10)) for _ in range(3)]
    await settle()
    assert not any(w.done() for w in waiters)
    bucket.set_rate(None, 10)
    await settle()
    assert all(w.done() for w in waiters)
    assert [w.result() for w in waiters] == [0.0, 0.0, 0.0]


async def test_going_from_unlimited_to_limited_starts_with_a_full_bucket() -> None:
    bucket, _ = auto_bucket(None, 0)
    await bucket.acquire(10_000)
    bucket.set_rate(1000, 200)
    assert await bucket.acquire(200) == 0.0
    assert await bucket.acquire(100) == pytest.approx(0.1)


async def test_a_smaller_burst_caps_saved_tokens_and_keeps_debt() -> None:
    bucket, _ = auto_bucket(1000, 1000)
    bucket.set_rate(1000, 100)
    assert bucket.tokens == pytest.approx(100)
    await bucket.acquire(600)
    bucket.set_rate(2000, 50)
    assert bucket.tokens == pytest.approx(-500)  # debt survives a rate change


async def test_waiters_are_served_in_arrival_order() -> None:
    t = ManualTime()
    bucket = TokenBucket(100, 100, clock=t.clock, sleep=t.sleep)
    await bucket.acquire(100)
    done: list[int] = []

    async def send(i: int, n: int) -> None:
        await bucket.acquire(n)
        done.append(i)

    tasks = [asyncio.create_task(send(i, n)) for i, n in enumerate([100, 10, 10])]
    await settle()
    # After 0.1 s the small chunks could go, but the big one came first and keeps its place.
    await t.advance(0.1)
    assert done == []
    await t.advance(0.9)
    assert done == [0]
    await t.advance(0.1)
    await t.advance(0.1)
    assert done == [0, 1, 2]
    await asyncio.gather(*tasks)


async def test_a_cancelled_waiter_takes_nothing() -> None:
    t = ManualTime()
    bucket = TokenBucket(100, 100, clock=t.clock, sleep=t.sleep)
    await bucket.acquire(100)
    waiter = asyncio.create_task(bucket.acquire(100))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await t.advance(1.0)
    assert bucket.tokens == pytest.approx(100)
    assert await bucket.acquire(100) == 0.0


@pytest.mark.parametrize(
    ("rate", "burst"), [(-1, 10), (10, -1), (float("inf"), 10), (10, float("nan"))]
)
def test_bad_parameters_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


async def test_negative_sizes_are_refused() -> None:
    bucket, _ = auto_bucket(10, 10)
    with pytest.raises(ValueError):
        await bucket.acquire(-1)


async def test_real_time_two_megabytes_at_ten_megabytes_per_second() -> None:
    # 2 MB through a 10 MB/s bucket with a 64 KB burst: the first 64 KB go at once, the rest
    # (1.936 MB) take 0.19 s. Loose bounds: CI machines stall.
    bucket = TokenBucket(10e6, 64e3)
    chunk = 64_000
    start = time.monotonic()
    sent = 0
    while sent < 2_000_000:
        n = min(chunk, 2_000_000 - sent)
        await bucket.acquire(n)
        sent += n
    elapsed = time.monotonic() - start
    assert 0.15 < elapsed < 0.6
