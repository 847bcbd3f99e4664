"""Network namespaces, veth pairs, a bridge, tc shaping and iptables, driven through ``ip``,
``tc`` and ``iptables`` (root only).

Everything made here lives inside namespaces whose names start with a per-run prefix, so one
``ip netns del`` per namespace removes every link, qdisc and rule with it; the only object in the
root namespace is the veth end that routes the test process to the coordinator, named with the
same prefix and removed by :func:`remove_prefix` (or with its peer's namespace).

Nothing here touches an interface it did not create: addresses are in a private /24 chosen per run
that no route of the root namespace covers, and multicast (mDNS) only ever crosses the bridge.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: Every testbed namespace and root-side link name starts with this.
BASE_PREFIX = "dmtb"


class NetnsUnavailable(RuntimeError):
    """This machine cannot run the testbed (not root, no ``ip``, no namespaces...)."""


def sh(argv: Sequence[str], *, check: bool = True, timeout: float = 20.0) -> str:
    """Run one command; raise with its stderr when it fails and ``check`` is set."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def run(ns: str | None, command: str, *, check: bool = True) -> str:
    """Run ``command`` (words split on spaces; no quoting needed here) in namespace ``ns``."""
    argv = command.split()
    return sh(ns_argv(ns, argv) if ns else argv, check=check)


def why_unavailable(*, need_iptables: bool = False) -> str | None:
    """None if namespaces work here, else the reason (for ``pytest.skip`` and the CLI)."""
    if os.geteuid() != 0:
        return "the fleet testbed needs root (network namespaces, veth, tc)"
    for tool in ("ip", "tc", *(["iptables"] if need_iptables else [])):
        if shutil.which(tool) is None:
            pkg = "iptables" if tool == "iptables" else "iproute2"
            return f"`{tool}` is not installed (apt-get install -y {pkg})"
    probe = f"{BASE_PREFIX}probe{os.getpid() % 100000}"
    try:
        sh(["ip", "netns", "add", probe])
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        return f"cannot create a network namespace: {err}"
    try:
        run(probe, "ip link add v0 type veth peer name v1")
        run(probe, "ip link add b0 type bridge")
        run(probe, "ip link add i0 type ifb")
        run(probe, "tc qdisc add dev i0 root tbf rate 10mbit burst 16kb latency 50ms")
        if need_iptables:
            run(probe, "iptables -A INPUT -s 10.0.0.1 -j DROP")
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        return f"namespaces work but a testbed feature does not: {err}"
    finally:
        sh(["ip", "netns", "del", probe], check=False)
    return None


def new_prefix() -> str:
    return f"{BASE_PREFIX}{random.randrange(16**4):04x}"


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0-10.249.255.0 that no route or address of the root namespace covers."""
    used = []
    for line in sh(["ip", "-4", "-o", "route", "show", "table", "all"]).splitlines():
        word = line.split()[0] if line.split() else ""
        if word in {"broadcast", "local", "unreachable", "multicast"}:
            word = line.split()[1]
        try:
            used.append(ipaddress.ip_network(word.replace("default", "0.0.0.0/0"), strict=False))
        except ValueError:
            continue
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{random.randrange(200, 250)}.{random.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NetnsUnavailable("no free private /24 for the testbed")


def list_namespaces(prefix: str = BASE_PREFIX) -> list[str]:
    names = []
    for line in sh(["ip", "netns", "list"], check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            names.append(name)
    return names


def kill_namespace_processes(ns: str, *, grace_s: float = 3.0) -> None:
    """SIGTERM every process in ``ns`` (all started by the testbed), SIGKILL what is left."""
    pids = _ns_pids(ns)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = _ns_pids(ns)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _ns_pids(ns: str) -> list[int]:
    out = sh(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def remove_prefix(prefix: str = BASE_PREFIX) -> list[str]:
    """Remove every namespace and root-namespace link named with ``prefix``; returns what went.

    Safe to call any time (``testbed down``, atexit, after a crash): it only touches names
    starting with ``prefix``, which must itself start with :data:`BASE_PREFIX`.
    """
    if not prefix.startswith(BASE_PREFIX):
        raise ValueError(f"testbed prefixes start with {BASE_PREFIX!r}, not {prefix!r}")
    removed = []
    for ns in list_namespaces(prefix):
        kill_namespace_processes(ns)
        sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    for line in sh(["ip", "-o", "link", "show"], check=False).splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(prefix):
                sh(["ip", "link", "del", name], check=False)
                removed.append(name)
    return removed


@dataclass(frozen=True, slots=True)
class Host:
    """A namespace on the LAN: its name, the bridge port it hangs off, its address."""

    ns: str
    port: str  # the veth end in the bridge namespace
    address: str


class Lan:
    """One bridge namespace and hosts attached to it by veth pairs, plus the shaping knobs."""

    def __init__(self, prefix: str, subnet: ipaddress.IPv4Network) -> None:
        self.prefix = prefix
        self.subnet = subnet
        self.bridge_ns = f"{prefix}-br"
        self.hosts: dict[str, Host] = {}
        self._next = 1
        self._shared_rate_mbps: float | None = None
        self._shared_queue_s = 0.1
        #: (address, bridge port) of the hosts whose traffic bypasses the shared medium.
        self._unshaped: list[tuple[str, str]] = []

    # -- building --------------------------------------------------------------------------
    def create(self) -> None:
        sh(["ip", "netns", "add", self.bridge_ns])
        br = self.bridge_ns
        run(br, "ip link set lo up")
        run(br, "ip link add br0 type bridge mcast_snooping 0 stp_state 0 forward_delay 0")
        run(br, "ip link set br0 up")

    def add_host(self, name: str) -> Host:
        """A new namespace ``<prefix>-<name>`` with ``eth0`` on the bridge and the next address."""
        ns = f"{self.prefix}-{name}"
        index = self._next
        self._next += 1
        address = str(self.subnet.network_address + index)
        port = f"p{index}"
        br = self.bridge_ns
        sh(["ip", "netns", "add", ns])
        run(ns, "ip link set lo up")
        run(br, f"ip link add {port} type veth peer name eth0 netns {ns}")
        run(br, f"ip link set {port} master br0")
        run(br, f"ip link set {port} up")
        run(ns, f"ip addr add {address}/{self.subnet.prefixlen} dev eth0")
        run(ns, "ip link set eth0 up")
        host = Host(ns, port, address)
        self.hosts[name] = host
        if self._shared_rate_mbps is not None:
            self._redirect_to_medium(port, self._unshaped)
        return host

    def splice(self, name: str) -> tuple[str, str]:
        """Cut host ``name``'s link to the bridge so a forwarder can join it again.

        Its veth end ``pN`` leaves the bridge and a new pair ``fN``-``qN`` is added with ``qN``
        as the bridge port; returns ``(pN, fN)``, the ends the forwarder (in the bridge
        namespace) joins. Done before :meth:`shared_medium`, so the medium takes ``qN``.
        """
        if self._shared_rate_mbps is not None:
            raise RuntimeError("splice hosts before setting up the shared medium")
        host = self.hosts[name]
        br, index = self.bridge_ns, host.port[1:]
        host_side, lan_side, port = host.port, f"f{index}", f"q{index}"
        run(br, f"ip link set {host_side} nomaster")
        run(br, f"ip link add {lan_side} type veth peer name {port}")
        run(br, f"ip link set {port} master br0")
        for dev in (host_side, lan_side):
            # the forwarder's ends carry others' frames only: no IPv6 of their own on the LAN
            run(br, f"sysctl -q -w net.ipv6.conf.{dev}.disable_ipv6=1")
            run(br, f"ip link set {dev} promisc on up")
        run(br, f"ip link set {port} up")
        self.hosts[name] = Host(host.ns, port, host.address)
        return host_side, lan_side

    def route_from_root(self, gateway: str) -> str:
        """A veth from the root namespace to host ``gateway`` (which forwards to the LAN).

        Returns the gateway's address on that link: the test process reaches the whole LAN
        through it, and nothing else is routed there.
        """
        gw = self.hosts[gateway]
        link = ipaddress.ip_network(f"{self.subnet.network_address + 252}/30")
        root_ip, gw_ip = str(link.network_address + 1), str(link.network_address + 2)
        root_if = f"{self.prefix}r"
        run(None, f"ip link add {root_if} type veth peer name up0 netns {gw.ns}")
        run(None, f"ip addr add {root_ip}/30 dev {root_if}")
        run(None, f"ip link set {root_if} up")
        run(gw.ns, f"ip addr add {gw_ip}/30 dev up0")
        run(gw.ns, "ip link set up0 up")
        run(gw.ns, "sysctl -q -w net.ipv4.ip_forward=1")
        lan = ipaddress.ip_network(f"{self.subnet.network_address}/25")
        run(None, f"ip route add {lan} via {gw_ip} dev {root_if}")
        for name, host in self.hosts.items():
            if name != gateway:
                run(host.ns, f"ip route add {link} via {gw.address}")
        self._root_link = (root_ip, gw_ip, gw.address)
        return gw_ip

    # -- the medium ------------------------------------------------------------------------
    def shared_medium(
        self, rate_mbps: float, *, exempt: Sequence[str] = (), queue_s: float = 0.1
    ) -> None:
        """All LAN frames share one rate: every bridge port's ingress goes through one ifb+tbf.

        Frames a host sends enter the bridge at its port's ingress, so redirecting every port's
        ingress to one ifb device puts all of the LAN's traffic through one token bucket, as on
        a Wi-Fi channel. An ``exempt`` host's traffic bypasses the medium both ways: what it
        sends and what is sent to it. Its queue holds ``queue_s`` seconds at the rate (a
        testbed dilated ``k`` times keeps the real medium's queue in bytes with ``k`` times the
        seconds).
        """
        br = self.bridge_ns
        run(br, "ip link add ifb0 type ifb")
        run(br, "ip link set ifb0 up")
        run(br, f"tc qdisc add dev ifb0 root {self._tbf(rate_mbps, queue_s)}")
        self._shared_rate_mbps = rate_mbps
        self._shared_queue_s = queue_s
        self._unshaped = [(self.hosts[name].address, self.hosts[name].port) for name in exempt]
        for name, host in self.hosts.items():
            if name not in exempt:
                self._redirect_to_medium(host.port, self._unshaped)

    def set_shared_rate(self, rate_mbps: float) -> None:
        if self._shared_rate_mbps is None:
            raise RuntimeError("this LAN has no shared medium")
        run(
            self.bridge_ns,
            f"tc qdisc change dev ifb0 root {self._tbf(rate_mbps, self._shared_queue_s)}",
        )
        self._shared_rate_mbps = rate_mbps

    def _redirect_to_medium(self, port: str, unshaped: Sequence[tuple[str, str]] = ()) -> None:
        br = self.bridge_ns
        run(br, f"tc qdisc add dev {port} handle ffff: ingress")
        # Matched first, frames to an exempt host go straight out of its bridge port. (``action
        # ok`` needs act_gact, which this kernel lacks, and a match with only a flowid is not
        # terminal: the frames fell through to the medium.)
        for address, to_port in unshaped:
            run(
                br,
                f"tc filter add dev {port} parent ffff: protocol ip prio 1 u32 "
                f"match ip dst {address}/32 action mirred egress redirect dev {to_port}",
            )
        run(
            br,
            f"tc filter add dev {port} parent ffff: protocol all prio 2 u32 match u32 0 0 "
            "action mirred egress redirect dev ifb0",
        )

    @staticmethod
    def _tbf(rate_mbps: float, queue_s: float = 0.1) -> str:
        # Burst: at least 2 full-size frames and about 2 ms at the rate (HZ-independent on
        # hrtimer kernels); queue: 100 ms at the rate by default, so a burst of TCP does not
        # tail-drop at once but a standing queue still shows as delay.
        rate_bps = rate_mbps * 1e6
        burst = max(int(rate_bps / 8 * 0.002), 2 * 1514 * 2)
        limit = max(int(rate_bps / 8 * queue_s), 4 * burst)
        return f"tbf rate {rate_mbps}mbit burst {burst} limit {limit}"

    def link_rates(self, rates_mbps: dict[tuple[str, str], float]) -> None:
        """Per-pair rates: htb at each sender's eth0, one class per destination address.

        ``rates_mbps[(a, b)]`` shapes a->b and b->a alike (a link is symmetric). Pairs not listed
        are unshaped.
        """
        by_sender: dict[str, dict[str, float]] = {}
        for (a, b), rate in rates_mbps.items():
            by_sender.setdefault(a, {})[b] = rate
            by_sender.setdefault(b, {})[a] = rate
        for sender, peers in by_sender.items():
            ns = self.hosts[sender].ns
            run(ns, "tc qdisc add dev eth0 root handle 1: htb default 999")
            run(ns, "tc class add dev eth0 parent 1: classid 1:999 htb rate 10gbit")
            for i, (peer, rate) in enumerate(sorted(peers.items()), start=1):
                run(ns, f"tc class add dev eth0 parent 1: classid 1:{i} htb rate {rate}mbit")
                run(
                    ns,
                    f"tc filter add dev eth0 parent 1: protocol ip prio 1 u32 match ip dst "
                    f"{self.hosts[peer].address}/32 flowid 1:{i}",
                )
        self._link_classes = {s: dict(enumerate(sorted(p), start=1)) for s, p in by_sender.items()}

    def set_link_rate(self, a: str, b: str, rate_mbps: float) -> None:
        for sender, peer in ((a, b), (b, a)):
            classes = self._link_classes[sender]
            i = next(k for k, v in classes.items() if v == peer)
            run(
                self.hosts[sender].ns,
                f"tc class change dev eth0 parent 1: classid 1:{i} htb rate {rate_mbps}mbit",
            )

    def shape_host(self, name: str, rate_mbps: float) -> None:
        """tbf on one host's egress: everything it sends leaves at ``rate_mbps``."""
        ns = self.hosts[name].ns
        run(ns, f"tc qdisc replace dev eth0 root {self._tbf(rate_mbps)}")

    # -- faults ----------------------------------------------------------------------------
    def cut(self, name: str) -> None:
        """Partition a host from the LAN: iptables drops all it sends and receives on eth0."""
        ns = self.hosts[name].ns
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            run(ns, f"iptables -I {chain} {flag} eth0 -j DROP")

    def heal(self, name: str) -> None:
        ns = self.hosts[name].ns
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            run(ns, f"iptables -D {chain} {flag} eth0 -j DROP", check=False)

    def loss(self, name: str, probability: float) -> None:
        """Drop a random ``probability`` of the packets a host receives."""
        ns = self.hosts[name].ns
        run(
            ns,
            f"iptables -A INPUT -i eth0 -m statistic --mode random "
            f"--probability {probability} -j DROP",
        )

    def clear_loss(self, name: str, probability: float) -> None:
        ns = self.hosts[name].ns
        run(
            ns,
            f"iptables -D INPUT -i eth0 -m statistic --mode random "
            f"--probability {probability} -j DROP",
            check=False,
        )

    def destroy(self) -> None:
        remove_prefix(self.prefix)
