"""Load shedding: a bound on the work a service has in flight, refused at once beyond it.

A service that queues whatever arrives runs out of memory or misses every deadline under a
burst; one that refuses the excess at once keeps serving what it took, and its callers learn
straight away (``RESOURCE_EXHAUSTED``, the SDK's ``ResourceExhausted``) that they may retry
later or elsewhere. Nothing waits here: a slot is free now or the request is refused.

Used from one event loop (a service's), so a counter is enough.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from doramesh.errors import ResourceExhausted


class InflightLimit:
    """At most ``limit`` units of work in flight; one more is refused, never queued."""

    def __init__(self, limit: int, what: str) -> None:
        if limit <= 0:
            raise ValueError(f"the in-flight limit must be positive, not {limit}")
        self.limit = limit
        self.what = what
        self.in_flight = 0
        #: How many were refused since the start (for stats and tests).
        self.refused = 0

    def try_acquire(self) -> bool:
        """Takes a slot if one is free; False (and counted as refused) if none is."""
        if self.in_flight >= self.limit:
            self.refused += 1
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        if self.in_flight <= 0:
            raise RuntimeError("released a slot that was not taken")
        self.in_flight -= 1

    def refusal(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"{self.limit} {self.what} already in flight; refused at once, retry later"
        )

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Holds a slot for the ``with`` block; ``ResourceExhausted`` at once if none is free."""
        if not self.try_acquire():
            raise self.refusal()
        try:
            yield
        finally:
            self.release()
