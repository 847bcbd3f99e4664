"""Traffic probes for the delay forwarder, and the measurement that reports its figures.

The probes (UDP echo and ping, a paced UDP source and an order-checking sink, a TCP bulk
source and sink) run inside the testbed's namespaces as ``python -P delay_probe.py PROBE ...``
(by path and stdlib only, so each starts in milliseconds; see :mod:`doramesh.testing.delay`)
and print one JSON line. ``python -m doramesh.testing.delay_probe measure`` builds a small LAN
with two hosts behind forwarders and two plain ones and reports, side by side in one run: the
round trip added against the configured delay, the forwarders' CPU at paced UDP rates and their
highest rate, and TCP goodput over a tbf-shaped link with and without the forwarders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: UDP payload that fills a 1500-byte MTU (1514-byte Ethernet frame).
MTU_PAYLOAD = 1472
_SEQ = struct.Struct("!Q")


# -- the probes (run inside a namespace) ------------------------------------------------------
def echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, addr = sock.recvfrom(2048)
        sock.sendto(data, addr)


def ping(dst: str, port: int, count: int, interval_s: float) -> dict[str, Any]:
    """Round trips (ms) of ``count`` small datagrams to an :func:`echo`; lost ones are left out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    rtts: list[float] = []
    for seq in range(count):
        start = time.perf_counter()
        sock.sendto(_SEQ.pack(seq), (dst, port))
        try:
            while _SEQ.unpack(sock.recv(64)[:8])[0] != seq:
                continue
        except TimeoutError:
            continue
        rtts.append((time.perf_counter() - start) * 1e3)
        time.sleep(interval_s)
    return {"sent": count, "rtts_ms": rtts}


def udp_source(dst: str, port: int, mbps: float, seconds: float) -> dict[str, Any]:
    """MTU-sized datagrams numbered in order, paced at ``mbps`` (0: as fast as possible)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    payload = bytearray(MTU_PAYLOAD)
    gap = MTU_PAYLOAD * 8 / (mbps * 1e6) if mbps > 0 else 0.0
    start = time.perf_counter()
    sent = errors = 0
    while (now := time.perf_counter()) - start < seconds:
        if gap and now < start + sent * gap:
            time.sleep(min(0.001, start + sent * gap - now))
            continue
        payload[:8] = _SEQ.pack(sent)
        try:
            sock.sendto(payload, (dst, port))
        except OSError:  # ENOBUFS: the local queue is full; the datagram is lost
            errors += 1
        sent += 1
    return {"sent": sent, "send_errors": errors, "seconds": time.perf_counter() - start}


def udp_sink(port: int, idle_s: float) -> dict[str, Any]:
    """Count datagrams until ``idle_s`` passes without one; ``reordered``: arrivals numbered
    below one already seen."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("0.0.0.0", port))
    print(json.dumps({"listening": port}), flush=True)
    received = total = reordered = 0
    highest = -1
    first = last = 0.0
    sock.settimeout(30.0)
    while True:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            break
        last = time.perf_counter()
        if not received:
            first = last
            sock.settimeout(idle_s)
        received += 1
        total += len(data)
        seq = _SEQ.unpack(data[:8])[0]
        if seq < highest:
            reordered += 1
        highest = max(highest, seq)
    seconds = max(last - first, 1e-9)
    return {
        "received": received,
        "reordered": reordered,
        "seconds": seconds,
        "mbps": total * 8 / seconds / 1e6,
    }


def tcp_sink(port: int) -> dict[str, Any]:
    server = socket.create_server(("0.0.0.0", port))
    print(json.dumps({"listening": port}), flush=True)
    conn, _ = server.accept()
    total, first = 0, 0.0
    while data := conn.recv(1 << 20):
        first = first or time.perf_counter()
        total += len(data)
    seconds = max(time.perf_counter() - first, 1e-9)
    return {"bytes": total, "seconds": seconds, "mbps": total * 8 / seconds / 1e6}


def tcp_source(dst: str, port: int, seconds: float) -> dict[str, Any]:
    conn = socket.create_connection((dst, port), timeout=30)
    chunk = b"\0" * (1 << 16)
    end = time.perf_counter() + seconds
    sent = 0
    while time.perf_counter() < end:
        conn.sendall(chunk)
        sent += len(chunk)
    conn.close()
    return {"bytes": sent}


# -- running probes from the test process ---------------------------------------------------
def probe_argv(ns: str, *args: object) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-P", str(Path(__file__).resolve())] + [
        str(a) for a in args
    ]


def run_probe(ns: str, *args: object, timeout: float = 120.0) -> dict[str, Any]:
    """Run a probe to its end in ``ns`` and return its JSON line."""
    proc = subprocess.run(probe_argv(ns, *args), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {args} in {ns}: exit {proc.returncode}: {proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


class Listener:
    """A sink or echo probe started in the background; :meth:`result` waits for its line."""

    def __init__(self, ns: str, *args: object) -> None:
        self.process = subprocess.Popen(
            probe_argv(ns, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if args[0] != "echo":
            assert self.process.stdout is not None
            self.process.stdout.readline()  # {"listening": port}: bound, ready for traffic

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        out, err = self.process.communicate(timeout=timeout)
        if self.process.returncode != 0:
            raise RuntimeError(f"probe exit {self.process.returncode}: {err}")
        result: dict[str, Any] = json.loads(out.splitlines()[-1])
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tcp_counters(ns: str) -> tuple[int, int]:
    """(segments sent, segments retransmitted) by TCP in namespace ``ns``."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    head, values = (line.split()[1:] for line in out.splitlines() if line.startswith("Tcp:"))
    tcp = dict(zip(head, values, strict=True))
    return int(tcp["OutSegs"]), int(tcp["RetransSegs"])


# -- the measurement --------------------------------------------------------------------------
@contextmanager
def _lan(delay_ms: float, logs: Path) -> Iterator[tuple[Any, list[int]]]:
    """Hosts a, b behind forwarders (``delay_ms`` out of each), c, d plain; forwarder pids."""
    from doramesh.testing.delay import DelaySpec, start_forwarder
    from doramesh.testing.netns import Lan, free_subnet, new_prefix, remove_prefix

    lan = Lan(new_prefix(), free_subnet())
    forwarders: list[subprocess.Popen[bytes]] = []
    try:
        lan.create()
        for name in "abcd":
            lan.add_host(name)
        for seed, name in enumerate("ab"):
            spec = DelaySpec(delay_ms)
            log = logs / f"{name}.log"
            forwarders.append(start_forwarder(lan, name, spec, seed=seed, log=log))
        yield lan, [p.pid for p in forwarders]
    finally:
        for proc in forwarders:
            proc.terminate()
            proc.wait(10)
        remove_prefix(lan.prefix)


def measure(delay_ms: float = 5.0, seconds: float = 4.0, link_mbps: float = 20.0) -> dict[str, Any]:
    import statistics
    import tempfile

    logs = Path(tempfile.mkdtemp(prefix="doramesh-delay-"))
    report: dict[str, Any] = {"delay_ms": delay_ms, "loadavg_before": os.getloadavg()}
    with _lan(delay_ms, logs) as (lan, pids):
        h = {name: lan.hosts[name] for name in "abcd"}
        echoes = [Listener(h[n].ns, "echo", 9000) for n in "bd"]
        time.sleep(0.5)
        rtt = {}
        for src, dst in (("a", "b"), ("c", "d")):
            got = run_probe(h[src].ns, "ping", h[dst].address, 9000, 200, 0.01)["rtts_ms"]
            rtt[src + dst] = {
                "p50": statistics.median(got),
                "min": min(got),
                "max": max(got),
                "lost": 200 - len(got),
            }
        for e in echoes:
            e.stop()
        report["rtt_ms"] = {
            "through_forwarders": rtt["ab"],
            "plain": rtt["cd"],
            "configured_added": 2 * delay_ms,
            "added_p50": rtt["ab"]["p50"] - rtt["cd"]["p50"],
        }
        udp = []
        for mbps in (20.0, 80.0, 0.0):
            sink = Listener(h["b"].ns, "udp-sink", 9001, 1.0)
            cpu0 = sum(cpu_seconds(p) for p in pids)
            t0 = time.perf_counter()
            sent = run_probe(h["a"].ns, "udp-source", h["b"].address, 9001, mbps, seconds)
            got = sink.result()
            wall = time.perf_counter() - t0
            cpu = sum(cpu_seconds(p) for p in pids) - cpu0
            udp.append(
                {
                    "offered_mbps": mbps or "max",
                    "received_mbps": got["mbps"],
                    "frames_per_s": got["received"] / got["seconds"],
                    "lost_fraction": 1 - got["received"] / sent["sent"],
                    "reordered": got["reordered"],
                    "forwarders_cpu_fraction": cpu / wall,
                    "cpu_us_per_frame": cpu / max(got["received"], 1) * 1e6,
                }
            )
        report["udp_1514_byte_frames"] = udp
        goodput = {}
        for name in "ac":
            lan.shape_host(name, link_mbps)
        for src, dst in (("a", "b"), ("c", "d")):
            sink = Listener(h[dst].ns, "tcp-sink", 9002)
            segs0 = tcp_counters(h[src].ns)
            run_probe(h[src].ns, "tcp-source", h[dst].address, 9002, seconds)
            got = sink.result()
            segs1 = tcp_counters(h[src].ns)
            goodput["through_forwarders" if src == "a" else "plain"] = {
                "mbps": got["mbps"],
                "ratio": got["mbps"] / link_mbps,
                "retransmitted_segments": segs1[1] - segs0[1],
                "segments": segs1[0] - segs0[0],
            }
        report[f"tcp_goodput_tbf_{link_mbps:g}_mbit"] = goodput
    # each forwarder's last line: what it forwarded and anything it or the kernel dropped
    report["forwarders"] = [
        json.loads(path.read_text().splitlines()[-1]) for path in sorted(logs.glob("*.log"))
    ]
    shutil.rmtree(logs)
    report["loadavg_after"] = os.getloadavg()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="delay_probe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    sub.add_parser("echo").add_argument("port", type=int)
    p = sub.add_parser("ping")
    for name, kind in (("dst", str), ("port", int), ("count", int), ("interval_s", float)):
        p.add_argument(name, type=kind)
    p = sub.add_parser("udp-source")
    for name, kind in (("dst", str), ("port", int), ("mbps", float), ("seconds", float)):
        p.add_argument(name, type=kind)
    p = sub.add_parser("udp-sink")
    p.add_argument("port", type=int)
    p.add_argument("idle_s", type=float)
    sub.add_parser("tcp-sink").add_argument("port", type=int)
    p = sub.add_parser("tcp-source")
    for name, kind in (("dst", str), ("port", int), ("seconds", float)):
        p.add_argument(name, type=kind)
    p = sub.add_parser("measure", help="the forwarder's figures (root; builds its own LAN)")
    p.add_argument("--delay-ms", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--link-mbps", type=float, default=20.0)
    args = vars(parser.parse_args(argv))
    probes: dict[str, Callable[..., Any]] = {
        "echo": echo,
        "ping": ping,
        "udp-source": udp_source,
        "udp-sink": udp_sink,
        "tcp-sink": tcp_sink,
        "tcp-source": tcp_source,
        "measure": measure,
    }
    name = args.pop("probe")
    result = probes[name](**args)
    print(json.dumps(result, indent=2 if name == "measure" else None), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
