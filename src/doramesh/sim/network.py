"""The network as fluid flows: processor sharing on a shared medium or on per-pair links.

Each *stream* is one (plan, sender, receiver) flow, as one gRPC stream between two agents is: its
transfers (activations, gradients, all-reduce chunks) leave in FIFO order, the head one getting the
stream's whole rate. Streams on the same *resource* share its capacity max-min fairly (water
filling), recomputed whenever a stream starts, finishes, or a rate or capacity changes:

- ``kind: shared`` (Wi-Fi-like): one resource, every stream in flight competes for it;
- ``kind: links``: each directed device pair is its own resource (links are full duplex, so
  gradients going back do not slow activations going forward).

Fair sharing is the ideal; the testbed saw TCP split a shared medium far less fairly, which is why
plans carry token buckets. A paced stream (``rate``, ``burst``) is a token bucket on the stream:
while it has tokens it takes its fair share, draining tokens at ``share - rate``; once empty its
share is capped at ``rate``; tokens refill at ``rate`` up to ``burst`` whenever it sends slower
than ``rate`` or is idle.

A transfer is delivered one path latency after its last byte is on the wire; latency does not hold
the resource (the next transfer starts at once, as with streamed chunks).

Transmit time is *airtime*: a stream sending at ``r`` on a resource of capacity ``C`` is on the
air ``r / C`` of the time, so a transfer costs ``bytes / C`` of radio time however it was shared
or paced (a paced or sharing radio sends full-rate frames, just fewer of them).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from doramesh.sim.engine import Callback, EventQueue, Owner
from doramesh.types import Network, NodeId

#: Bytes per second in one Mbit/s.
BYTES_PER_MBIT = 1e6 / 8
#: Bytes a transfer may be short of and still count as sent (float rounding of rate x time).
_EPS_BYTES = 1e-3
#: Tokens below this are an empty bucket.
_EPS_TOKENS = 1e-3

StreamKey = tuple[int, str, str]
Resource = str | tuple[str, str]
_MEDIUM: Resource = "medium"


@dataclass(slots=True, eq=False)
class Transfer:
    size: float
    remaining: float
    latency_s: float
    owner: Owner
    on_delivered: Callback


class _Stream:
    __slots__ = (
        "burst",
        "dst",
        "pace",
        "queue",
        "rate",
        "resource",
        "src",
        "tokens",
        "tokens_at",
    )

    def __init__(
        self, src: str, dst: str, resource: Resource, pace: tuple[float, float] | None
    ) -> None:
        self.src = src
        self.dst = dst
        self.resource = resource
        self.queue: deque[Transfer] = deque()
        self.rate = 0.0  # bytes/s given to the head transfer now
        # Token bucket in bytes and bytes/s; a new bucket starts full.
        self.pace = pace[0] if pace else 0.0
        self.burst = pace[1] if pace else 0.0
        self.tokens = self.burst
        self.tokens_at = 0.0


class NetworkModel:
    def __init__(self, events: EventQueue, network: Network) -> None:
        self._events = events
        self._network = network
        self._shared = network.kind == "shared"
        self._capacity: dict[Resource, float] = {}
        if self._shared:
            self._capacity[_MEDIUM] = max(0.0, network.bandwidth_mbps) * BYTES_PER_MBIT
        else:
            for link in network.links:
                rate = max(0.0, link.bandwidth_mbps) * BYTES_PER_MBIT
                self._capacity[(link.a, link.b)] = rate
                self._capacity[(link.b, link.a)] = rate
        self._latency: dict[tuple[str, str], float] = {}
        self._streams: dict[StreamKey, _Stream] = {}
        # Insertion-ordered, so allocation and tie-breaking do not depend on hashing.
        self._active: dict[_Stream, None] = {}
        self._last = 0.0
        self._version = 0
        # Rates are recomputed once per instant, however many transfers start in it.
        self._allocation_due = False
        self.airtime_s: dict[str, float] = {}

    # --- queries -------------------------------------------------------------------------------

    def capacity_bps(self, src: str, dst: str) -> float:
        """Bytes per second the path between two devices offers now (0: no path)."""
        if src == dst:
            return math.inf
        return self._capacity.get(_MEDIUM if self._shared else (src, dst), 0.0)

    def latency_s(self, src: str, dst: str) -> float:
        key = (src, dst)
        cached = self._latency.get(key)
        if cached is None:
            _, ms = self._network.link(NodeId(src), NodeId(dst))
            cached = ms / 1e3 if math.isfinite(ms) else 0.0
            self._latency[key] = cached
        return cached

    # --- changes -------------------------------------------------------------------------------

    def send(
        self,
        key: StreamKey,
        src: str,
        dst: str,
        nbytes: float,
        owner: Owner,
        on_delivered: Callback,
        *,
        pace: tuple[float, float] | None = None,
        latency_scale: float = 1.0,
    ) -> None:
        """Put ``nbytes`` on the stream ``key``; ``on_delivered`` runs when they have arrived."""
        latency = self.latency_s(src, dst) * latency_scale
        if nbytes <= 0:
            self._events.after(latency, on_delivered)
            return
        self._advance()
        stream = self._streams.get(key)
        if stream is None:
            resource = _MEDIUM if self._shared else (src, dst)
            stream = _Stream(src, dst, resource, pace)
            self._capacity.setdefault(resource, 0.0)
            self._streams[key] = stream
        stream.queue.append(Transfer(nbytes, nbytes, latency, owner, on_delivered))
        if stream not in self._active:
            if stream.pace > 0:  # an idle bucket refilled meanwhile
                idle = self._events.now - stream.tokens_at
                stream.tokens = min(stream.burst, stream.tokens + stream.pace * idle)
            self._active[stream] = None
        if not self._allocation_due:
            self._allocation_due = True
            self._events.at(self._events.now, self._reallocate)

    def set_bandwidth(self, mbps: float) -> None:
        """The shared medium, or every link, now runs at ``mbps``."""
        self._advance()
        rate = max(0.0, mbps) * BYTES_PER_MBIT
        for resource in self._capacity:
            self._capacity[resource] = rate
        self._settle()
        self._allocate()

    def drop_device(self, node: str) -> list[Owner]:
        """A device left: every transfer from or to it is cut. Returns the owners it cut."""
        self._advance()
        owners: list[Owner] = []
        for stream in self._streams.values():
            if (stream.src == node or stream.dst == node) and stream.queue:
                owners.extend(t.owner for t in stream.queue)
                stream.queue.clear()
                self._deactivate(stream)
        self._settle()
        self._allocate()
        return owners

    # --- the fluid model -----------------------------------------------------------------------

    def _advance(self) -> None:
        """Move every active stream forward to now at its current rate."""
        now = self._events.now
        dt = now - self._last
        self._last = now
        if dt <= 0:
            return
        for stream in self._active:
            rate = stream.rate
            if rate > 0:
                moved = rate * dt
                stream.queue[0].remaining -= moved
                capacity = self._capacity[stream.resource]
                if capacity > 0:
                    src = stream.src
                    self.airtime_s[src] = self.airtime_s.get(src, 0.0) + moved / capacity
            if stream.pace > 0:
                stream.tokens = min(
                    stream.burst, max(0.0, stream.tokens + (stream.pace - rate) * dt)
                )
                stream.tokens_at = now

    def _deactivate(self, stream: _Stream) -> None:
        self._active.pop(stream, None)
        stream.rate = 0.0
        stream.tokens_at = self._events.now

    def _settle(self) -> None:
        """Deliver the transfers whose bytes are all out; skip unstarted ones of lost owners."""
        now = self._events.now
        for stream in list(self._active):
            queue = stream.queue
            while queue:
                head = queue[0]
                done = head.remaining <= max(_EPS_BYTES, 1e-12 * head.size) or (
                    stream.rate > 0 and now + head.remaining / stream.rate <= now
                )
                if done:
                    queue.popleft()
                    self._events.after(head.latency_s, head.on_delivered)
                elif head.owner.lost and head.remaining >= head.size:
                    queue.popleft()
                else:
                    break
            if not queue:
                self._deactivate(stream)

    def _allocate(self) -> None:
        """Max-min fair rates per resource, token-bucket caps included; schedule the next change."""
        by_resource: dict[Resource, list[_Stream]] = {}
        for stream in self._active:
            by_resource.setdefault(stream.resource, []).append(stream)
        for resource, streams in by_resource.items():
            _water_fill(self._capacity[resource], streams)
        wake = math.inf
        for stream in self._active:
            rate = stream.rate
            if rate <= 0:
                continue
            wake = min(wake, stream.queue[0].remaining / rate)
            if stream.pace > 0 and stream.tokens > _EPS_TOKENS and rate > stream.pace:
                wake = min(wake, stream.tokens / (rate - stream.pace))
        self._version += 1
        self._allocation_due = False
        if math.isfinite(wake):
            version = self._version
            self._events.after(wake, lambda: self._wake(version))

    def _wake(self, version: int) -> None:
        if version == self._version:
            self._reallocate()

    def _reallocate(self) -> None:
        self._advance()
        self._settle()
        self._allocate()


def _water_fill(capacity: float, streams: list[_Stream]) -> None:
    if all(stream.pace <= 0 for stream in streams):  # the common case: an equal split
        fair = capacity / len(streams)
        for stream in streams:
            stream.rate = fair
        return

    def cap(stream: _Stream) -> float:
        return stream.pace if stream.pace > 0 and stream.tokens <= _EPS_TOKENS else math.inf

    left = capacity
    pending = sorted(streams, key=cap)  # stable: equal caps keep their activation order
    for i, stream in enumerate(pending):
        fair = left / (len(pending) - i)
        stream.rate = min(cap(stream), fair)
        left -= stream.rate


def pace_of(rate_mbps: float, burst_kb: float, *, min_burst_bytes: float) -> tuple[float, float]:
    """A flow's token bucket in bytes/s and bytes, with the agent's floor on the burst."""
    return rate_mbps * BYTES_PER_MBIT, max(burst_kb * 1e3, min_burst_bytes)
