"""A token bucket that paces outgoing tensor chunks to the rate the network scheduler assigned.

On a shared medium (Wi-Fi) every flow competes for one capacity; the planner's network scheduler
gives each flow a rate and a burst so the latency-critical transfers are not starved. The sender
calls ``await bucket.acquire(len(chunk))`` before each write.

Pure: no gRPC, no torch, no I/O. The clock and the sleep are injected so tests are deterministic.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

#: Shortfalls below this many bytes are float rounding in the refill arithmetic, not a reason to
#: sleep again for a few femtoseconds.
_EPSILON_BYTES = 1e-6


def _is_unlimited(rate: float | None) -> bool:
    return rate is None or rate == 0


class TokenBucket:
    """Classic token bucket over bytes, with debt for chunks larger than the burst.

    The bucket holds up to ``burst_bytes`` tokens and refills at ``rate_bytes_per_s``. A chunk of
    ``n`` bytes waits until ``min(n, burst)`` tokens are there and then takes all ``n``, so a chunk
    bigger than the burst drives the bucket negative (debt) instead of waiting forever; the long-run
    rate is still exactly the configured one because the next chunk waits for the debt to be repaid.

    Waiters are served in arrival order (one lock, FIFO), so a stream of small chunks cannot starve
    a big one. ``rate`` of ``0`` or ``None`` means unlimited: ``acquire`` never waits.

    Not thread-safe: use it from one event loop (the sender's), which is where it is awaited.
    """

    def __init__(
        self,
        rate_bytes_per_s: float | None,
        burst_bytes: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        _check(rate_bytes_per_s, burst_bytes)
        self._clock = clock
        self._sleep = sleep
        self._rate = rate_bytes_per_s
        self._burst = float(burst_bytes)
        # A new bucket starts full: the first burst goes out at once.
        self._tokens = self._burst
        self._last = clock()
        self._lock = asyncio.Lock()
        # Set (and replaced) by set_rate so a waiter recomputes at once instead of sleeping on a
        # deadline computed from the old rate.
        self._changed = asyncio.Event()

    @property
    def rate(self) -> float | None:
        """Bytes per second, or ``None``/``0`` for unlimited."""
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def unlimited(self) -> bool:
        return _is_unlimited(self._rate)

    @property
    def tokens(self) -> float:
        """Bytes that may go out now; negative while a big chunk's debt is being repaid."""
        self._refill()
        return self._tokens

    def set_rate(self, rate_bytes_per_s: float | None, burst_bytes: float) -> None:
        """Change rate and burst live; a waiting ``acquire`` picks the new figures up at once."""
        _check(rate_bytes_per_s, burst_bytes)
        was_unlimited = self.unlimited
        self._refill()  # settle what the old rate earned before switching
        self._rate = rate_bytes_per_s
        self._burst = float(burst_bytes)
        if was_unlimited:
            # Nothing was tracked while unlimited: start the limited phase with a full bucket.
            self._tokens = self._burst
        else:
            # Keep any debt; a smaller burst caps the saved-up tokens.
            self._tokens = min(self._tokens, self._burst)
        self._last = self._clock()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def acquire(self, n: int) -> float:
        """Wait until ``n`` bytes may be sent and take them; return the seconds waited."""
        if n < 0:
            raise ValueError(f"cannot acquire a negative number of bytes ({n})")
        if n == 0 or self.unlimited:
            return 0.0
        start = self._clock()
        async with self._lock:
            while not self.unlimited:
                self._refill()
                need = min(float(n), self._burst)
                if self._tokens + _EPSILON_BYTES >= need:
                    self._tokens -= n
                    break
                assert self._rate is not None  # not unlimited
                await self._wait((need - self._tokens) / self._rate)
        return max(0.0, self._clock() - start)

    def _refill(self) -> None:
        now = self._clock()
        if not self.unlimited:
            assert self._rate is not None
            elapsed = max(0.0, now - self._last)
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._last = now

    async def _wait(self, seconds: float) -> None:
        """Sleep ``seconds`` or until ``set_rate`` is called, whichever comes first."""
        changed = self._changed
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        woken = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            woken.cancel()


def _check(rate: float | None, burst: float) -> None:
    if rate is not None and (not math.isfinite(rate) or rate < 0):
        raise ValueError(f"rate must be a non-negative finite number of bytes/s, not {rate!r}")
    if not math.isfinite(burst) or burst < 0:
        raise ValueError(f"burst must be a non-negative finite number of bytes, not {burst!r}")
