"""Per-hop delay and jitter from the userspace forwarder (doramesh.testing.delay), on a real
namespace LAN: round trips, jitter without reordering, TCP and mDNS through it, and teardown.

Bounds are one-sided where the box's load can only add time: a frame is never released before
its delay, but a busy box may release it late.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from doramesh.testing.delay import DelaySpec, start_forwarder
from doramesh.testing.delay_probe import Listener, run_probe, tcp_counters
from doramesh.testing.netns import Lan, free_subnet, list_namespaces, new_prefix, remove_prefix
from doramesh.testing.testbed import HostSpec, Testbed

DELAY_MS = 20.0
JITTER_DELAY_MS, JITTER_MS = 10.0, 8.0
ECHO_PORT = 9000


def _gone(pid: int) -> bool:
    if not Path(f"/proc/{pid}").exists():
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lan, list[int]]]:
    """a, b behind 20 ms forwarders; c, d behind 10 +- 8 ms; e, f plain. Echo on b, d, f."""
    logs = tmp_path_factory.mktemp("delay")
    lan = Lan(new_prefix(), free_subnet())
    procs: list[subprocess.Popen[bytes]] = []
    echoes: list[Listener] = []
    try:
        lan.create()
        for name in "abcdef":
            lan.add_host(name)
        for seed, (name, spec) in enumerate(
            (n, DelaySpec(DELAY_MS) if n in "ab" else DelaySpec(JITTER_DELAY_MS, JITTER_MS))
            for n in "abcd"
        ):
            procs.append(start_forwarder(lan, name, spec, seed=seed, log=logs / f"{name}.log"))
        echoes = [Listener(lan.hosts[n].ns, "echo", ECHO_PORT) for n in "bdf"]
        yield lan, [p.pid for p in procs]
    finally:
        for echo in echoes:
            echo.stop()
        # the forwarders are left running on purpose: removal by prefix (what `testbed down`
        # does after a crash) must end them with their namespace
        remove_prefix(lan.prefix)
        for proc in procs:
            proc.wait(10)
    assert list_namespaces(lan.prefix) == []


def _rtts(lan: Lan, src: str, dst: str, count: int = 60) -> list[float]:
    got = run_probe(lan.hosts[src].ns, "ping", lan.hosts[dst].address, ECHO_PORT, count, 0.005)
    assert len(got["rtts_ms"]) >= count - 2, got
    return list(got["rtts_ms"])


def test_round_trip_is_twice_the_one_way_delay(lan: tuple[Lan, list[int]]) -> None:
    net, _ = lan
    delayed, plain = _rtts(net, "a", "b"), _rtts(net, "e", "f")
    # each host's forwarder delays what it sends: a->b and b->a each cost DELAY_MS once
    assert min(delayed) >= 2 * DELAY_MS - 0.1, delayed
    assert statistics.median(delayed) - statistics.median(plain) < 2 * DELAY_MS + 10.0, delayed
    assert statistics.median(plain) < DELAY_MS, plain


def test_jitter_spreads_round_trips_without_reordering(lan: tuple[Lan, list[int]]) -> None:
    net, _ = lan
    rtts = _rtts(net, "c", "d", count=100)
    assert min(rtts) >= 2 * (JITTER_DELAY_MS - JITTER_MS) - 0.1, rtts
    assert max(rtts) - min(rtts) > JITTER_MS, rtts  # uniform +-8 ms twice: about 16 ms wide
    sink = Listener(net.hosts["d"].ns, "udp-sink", 9001, 1.0)
    sent = run_probe(net.hosts["c"].ns, "udp-source", net.hosts["d"].address, 9001, 10.0, 2.0)
    got = sink.result()
    assert got["reordered"] == 0, got
    assert got["received"] >= 0.95 * sent["sent"], (sent, got)


def test_tcp_through_jitter_has_no_retransmission_storm(lan: tuple[Lan, list[int]]) -> None:
    net, _ = lan
    c, d = net.hosts["c"], net.hosts["d"]
    sink = Listener(d.ns, "tcp-sink", 9002)
    segments0, retrans0 = tcp_counters(c.ns)
    run_probe(c.ns, "tcp-source", d.address, 9002, 3.0)
    got = sink.result()
    segments1, retrans1 = tcp_counters(c.ns)
    assert got["bytes"] > 10e6, got  # TCP works: tens of MB in 3 s over a 10 +- 8 ms hop
    assert retrans1 - retrans0 <= 0.01 * (segments1 - segments0), (segments1, retrans1)


def test_forwarders_keep_running_until_torn_down(lan: tuple[Lan, list[int]]) -> None:
    _, pids = lan
    assert not any(_gone(pid) for pid in pids)


def test_testbed_with_latency_discovers_by_mdns_and_leaves_nothing_behind() -> None:
    hosts = [HostSpec("pi5", "raspberry-pi-5"), HostSpec("orin", "jetson-orin-nano")]
    with Testbed(hosts, latency_ms=10.0, jitter_ms=2.0, shared_mbps=100.0) as tb:
        # up() returned: the coordinator found both agents by mDNS through the forwarders
        forwarders = {n: d for n, d in tb.daemons.items() if n.startswith("delay-")}
        assert sorted(forwarders) == ["delay-co", "delay-orin", "delay-pi5"]
        assert all(d.alive() for d in forwarders.values())
        assert tb.lan is not None
        co, pi5 = tb.lan.hosts["co"], tb.lan.hosts["h0"]
        echo = Listener(pi5.ns, "echo", ECHO_PORT)
        try:
            got = run_probe(co.ns, "ping", pi5.address, ECHO_PORT, 20, 0.01)["rtts_ms"]
        finally:
            echo.stop()
        assert min(got) >= 2 * (10.0 - 2.0) - 0.1, got
        prefix, pids = tb.prefix, [d.pid for d in forwarders.values()]
    assert list_namespaces(prefix) == []
    assert all(_gone(pid) for pid in pids)


def test_a_failed_up_tears_the_forwarders_down() -> None:
    tb = Testbed([HostSpec("pi5", "raspberry-pi-5")], latency_ms=5.0)
    with pytest.raises(TimeoutError):
        tb.up(timeout=0.01)  # forwarders start, then the coordinator cannot be healthy in time
    pids = [d.pid for n, d in tb.daemons.items() if n.startswith("delay-")]
    assert len(pids) == 2
    assert list_namespaces(tb.prefix) == []
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids)


def test_sigterm_to_the_testbed_process_removes_the_forwarders(tmp_path: Path) -> None:
    prefix = new_prefix()
    script = (
        "import time\n"
        "from doramesh.testing.testbed import Testbed\n"
        "from doramesh.testing.testbed_cli import _exit_on_sigterm\n"
        "_exit_on_sigterm()\n"  # what `doramesh testbed run` does
        f"tb = Testbed([], latency_ms=5.0, prefix={prefix!r}).up()\n"
        "print(*(d.pid for n, d in tb.daemons.items() if n.startswith('delay-')), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1, proc.stderr.read() if proc.stderr else ""
        assert list_namespaces(prefix) != []
        proc.terminate()
        proc.wait(60)
        # checked before the cleanup below, which would remove them itself
        assert list_namespaces(prefix) == []
        assert _gone(pids[0])
    finally:
        if proc.poll() is None:
            proc.kill()
        remove_prefix(prefix)
