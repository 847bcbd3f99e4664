"""Per-hop delay and jitter for the namespace testbed, added by a userspace forwarder.

This kernel has no ``netem``, so latency cannot be a qdisc. Instead a host's veth is cut in two
in the bridge namespace (:meth:`doramesh.testing.netns.Lan.splice`) and this forwarder joins the
halves again: it reads every frame with an ``AF_PACKET`` socket on one half, holds it until its
release time and writes it unchanged to the other half. Working at layer 2 means ARP, IPv6
neighbour discovery and mDNS multicast pass exactly as on the wire, and the host's own ``eth0``
(its address, tc shaping, iptables faults, byte counters) is untouched.

Frames the host sends are delayed (one-way per hop, as netem on the host's egress would do), so
a round trip between two delayed hosts costs twice the configured delay; frames towards the host
are passed on at once. A frame's release time is ``max(previous release, now + delay + jitter)``
with the jitter drawn uniformly from ``[-jitter, +jitter]``: never earlier than the frame before,
so jitter spreads the delay without reordering a flow (TCP would read reordering as loss).
Because release times never decrease, each direction is a FIFO, not a heap.

The socket asks for a ``virtio_net_hdr`` before each frame (``PACKET_VNET_HDR``) and writes it
back: a veth hands over TSO super-frames of up to 64 KiB with their checksums still to be filled
in, and the header carries both facts across, so nothing needs ``ethtool`` and TCP keeps its
large frames.

The forwarder runs as its own process (``python -P delay.py forward ...``, by path: importing
``doramesh.testing`` would pull in torch and gRPC, seconds and hundreds of MB per forwarder) in
the bridge namespace, so tearing the namespace down by prefix also ends it.
"""

from __future__ import annotations

import argparse
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from doramesh.testing.netns import Lan

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_STATISTICS = 6
#: A 64 KiB GSO frame, its Ethernet header and the virtio_net_hdr in front.
MAX_FRAME = 65536 + 14 + 10 + 64
#: Frames read from one socket before the loop looks at due frames again.
READ_BATCH = 64
#: Bytes held per direction before frames are dropped (about 800 ms at 80 Mbit/s).
MAX_QUEUE_BYTES = 8 << 20

log = structlog.get_logger("doramesh.testing.delay")


@dataclass(frozen=True, slots=True)
class DelaySpec:
    """Delay added to the frames a host sends, and its jitter (both in ms, jitter uniform)."""

    delay_ms: float
    jitter_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"delay and jitter must be >= 0 ms, not {self}")


class DelayLine:
    """Frames of one direction, in arrival order, each with its release time (monotonic s)."""

    def __init__(
        self, spec: DelaySpec, rng: random.Random, *, max_bytes: int = MAX_QUEUE_BYTES
    ) -> None:
        self._delay_s = spec.delay_ms / 1e3
        self._jitter_s = spec.jitter_ms / 1e3
        self._rng = rng
        self._max_bytes = max_bytes
        self._frames: deque[tuple[float, bytes]] = deque()
        self._bytes = 0
        self._last_release = 0.0
        self.dropped = 0

    def release_time(self, now: float) -> float:
        """When a frame arriving ``now`` leaves: never before ``now``, never before the last."""
        wait = self._delay_s
        if self._jitter_s:
            wait = max(0.0, wait + self._rng.uniform(-self._jitter_s, self._jitter_s))
        self._last_release = max(self._last_release, now + wait)
        return self._last_release

    def push(self, now: float, frame: bytes) -> bool:
        """Hold ``frame``; False (and counted) when the line already holds its byte limit."""
        if self._bytes + len(frame) > self._max_bytes:
            self.dropped += 1
            return False
        self._frames.append((self.release_time(now), frame))
        self._bytes += len(frame)
        return True

    def next_release(self) -> float | None:
        return self._frames[0][0] if self._frames else None

    def pop_due(self, now: float) -> Iterator[bytes]:
        """The frames whose release time has come, oldest first."""
        frames = self._frames
        while frames and frames[0][0] <= now:
            _, frame = frames.popleft()
            self._bytes -= len(frame)
            yield frame

    def __len__(self) -> int:
        return len(self._frames)


def _kernel_drops(sock: socket.socket) -> int:
    """Frames the kernel dropped because this socket's receive buffer was full."""
    _, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return int(drops)


def _packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    # our own writes on this interface must not come back to us as received frames
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


@dataclass(slots=True)
class _Direction:
    source: socket.socket
    sink: socket.socket
    line: DelayLine
    forwarded: int = 0
    send_errors: int = 0


def forward(
    host_side: str,
    lan_side: str,
    spec: DelaySpec,
    *,
    seed: int = 0,
    ready_fd: int | None = None,
) -> None:
    """Forward frames between two interfaces until SIGTERM/SIGINT; ``host_side``->``lan_side``
    delayed by ``spec``, the other way at once. Writes one byte to ``ready_fd`` once both
    sockets are bound (no frame is lost after that)."""
    host_sock, lan_sock = _packet_socket(host_side), _packet_socket(lan_side)
    rng = random.Random(seed)
    out = _Direction(host_sock, lan_sock, DelayLine(spec, rng))
    back = _Direction(lan_sock, host_sock, DelayLine(DelaySpec(0.0), rng))
    by_socket = {host_sock: out, lan_sock: back}
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    log.info("delay forwarder ready", host_side=host_side, lan_side=lan_side, spec=str(spec))
    try:
        while True:
            heads = [t for d in (out, back) if (t := d.line.next_release()) is not None]
            timeout = max(0.0, min(heads) - time.monotonic()) if heads else None
            # select, not epoll: its timeout has microsecond resolution, epoll's milliseconds
            readable, _, _ = select.select([host_sock, lan_sock], [], [], timeout)
            for sock in readable:
                direction = by_socket[sock]
                now = time.monotonic()
                for _ in range(READ_BATCH):
                    try:
                        frame = sock.recv(MAX_FRAME)
                    except BlockingIOError:
                        break
                    direction.line.push(now, frame)
            now = time.monotonic()
            for direction in (out, back):
                for frame in direction.line.pop_due(now):
                    try:
                        direction.sink.send(frame)
                        direction.forwarded += 1
                    except OSError:  # ENOBUFS and the like: the frame is lost, as on a wire
                        direction.send_errors += 1
    finally:
        log.info(
            "delay forwarder stopped",
            forwarded_out=out.forwarded,
            forwarded_back=back.forwarded,
            dropped=out.line.dropped + back.line.dropped,
            send_errors=out.send_errors + back.send_errors,
            socket_drops=_kernel_drops(host_sock) + _kernel_drops(lan_sock),
        )
        host_sock.close()
        lan_sock.close()


def forwarder_argv(
    host_side: str, lan_side: str, spec: DelaySpec, *, seed: int, ready_fd: int
) -> list[str]:
    """The command that runs :func:`forward` in a fresh interpreter (see the module doc)."""
    return [
        sys.executable,
        "-P",
        str(Path(__file__).resolve()),
        "forward",
        host_side,
        lan_side,
        f"--delay-ms={spec.delay_ms}",
        f"--jitter-ms={spec.jitter_ms}",
        f"--seed={seed}",
        f"--ready-fd={ready_fd}",
    ]


def start_forwarder(
    lan: Lan, host: str, spec: DelaySpec, *, seed: int, log: Path, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """Splice host ``host`` of ``lan`` and start its forwarder in the bridge namespace; returns
    once the forwarder has its sockets bound. Its own session, like the testbed's daemons: it
    ends on SIGTERM or with the bridge namespace (:func:`doramesh.testing.netns.remove_prefix`).
    """
    host_side, lan_side = lan.splice(host)
    ready_r, ready_w = os.pipe()
    try:
        try:
            argv = forwarder_argv(host_side, lan_side, spec, seed=seed, ready_fd=ready_w)
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", lan.bridge_ns, *argv],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=(ready_w,),
                    start_new_session=True,
                )
        finally:
            os.close(ready_w)  # the forwarder holds the only write end now
        ready, _, _ = select.select([ready_r], [], [], timeout)
        if not ready or os.read(ready_r, 1) != b"1":
            proc.kill()
            proc.wait(5)
            raise RuntimeError(f"delay forwarder for {host} did not start:\n{log.read_text()}")
    finally:
        os.close(ready_r)
    return proc


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="delay.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fwd = sub.add_parser("forward", help="forward frames between two interfaces, delayed")
    fwd.add_argument("host_side")
    fwd.add_argument("lan_side")
    fwd.add_argument("--delay-ms", type=float, required=True)
    fwd.add_argument("--jitter-ms", type=float, default=0.0)
    fwd.add_argument("--seed", type=int, default=0)
    fwd.add_argument("--ready-fd", type=int, default=None)
    args = parser.parse_args(argv)

    from doramesh.logging import configure_logging

    configure_logging()
    # SIGTERM must interrupt select (PEP 475 retries it otherwise) and run the finally above
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, _raise_exit)
    forward(
        args.host_side,
        args.lan_side,
        DelaySpec(args.delay_ms, args.jitter_ms),
        seed=args.seed,
        ready_fd=args.ready_fd,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
