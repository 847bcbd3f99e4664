"""The fleet testbed: a real multi-host LAN in network namespaces on one Linux box (root only).

Layout (``P`` is a per-run prefix such as ``dmtb3f2a``)::

    root namespace ── Pr ══ up0 ─┐
                                 P-co  (planner + coordinator, started from compose.yaml)
                                 │ eth0
    P-br:  br0 ── p1 ┘  p2 ── eth0 P-h0 (agent --emulate CLASS)
                   └─── p3 ── eth0 P-h1 (agent ...)    ...

* one namespace per device host, each with ``eth0`` on a bridge that lives in its own namespace;
  addresses in a private /24 that no root route covers;
* the planner and the coordinator share one namespace and are started with the commands and
  environment ``compose.yaml`` names (plus what host networking on a LAN would give them: the
  LAN address to advertise and the interface mDNS binds to); readiness is compose's own health
  check, run in that namespace;
* agents run ``doramesh agent`` (compose's agent command) with ``--emulate CLASS`` and announce by
  real mDNS on their ``eth0``; the coordinator browses on its own ``eth0`` across the bridge;
* the medium: a shared rate (every bridge port's ingress redirected to one ifb with tbf) or
  per-pair rates (htb at each sender); loss and partitions with iptables;
* the test process reaches the coordinator (and through it the LAN) over one veth from the root
  namespace, so ``doramesh.Client`` runs in the caller's process.

Everything is torn down by :meth:`Testbed.down`, also at interpreter exit and after a failed
``up``; ``doramesh testbed down`` removes whatever a crashed run left (by prefix).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

from doramesh.testing.compose import COMPOSE_FILE, ComposeService, load_compose, start_order
from doramesh.testing.delay import DelaySpec, start_forwarder
from doramesh.testing.netns import (
    Lan,
    NetnsUnavailable,
    free_subnet,
    new_prefix,
    ns_argv,
    remove_prefix,
    why_unavailable,
)

#: Where ``testbed up`` records a running testbed for ``testbed down``.
STATE_DIR = Path("/run/doramesh-testbed")
COORDINATOR_PORT = 7070
AGENT_PORT = 7072


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One device host: the agent's node id and the catalogue class it emulates."""

    node_id: str
    device_class: str | None


@dataclass
class Daemon:
    name: str
    ns: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Testbed:
    """A fleet on a namespace LAN. ``with Testbed(hosts) as tb:`` brings it up and down."""

    __test__ = False  # not a pytest test class

    hosts: Sequence[HostSpec]
    #: Shared-medium rate (Mbit/s) for all LAN traffic; None: unshaped (or per-link rates).
    shared_mbps: float | None = None
    #: Seconds of traffic the shared medium's queue holds at its rate.
    shared_queue_s: float = 0.1
    #: Per-pair rates in Mbit/s, by node ids; shapes each direction at the sender.
    link_mbps: Mapping[tuple[str, str], float] = field(default_factory=dict)
    #: Bandwidth and latency the coordinator tells the planner (its DORAMESH_NETWORK_* vars).
    planner_network_mbps: float | None = None
    planner_network_latency_ms: float | None = None
    compose_file: Path = COMPOSE_FILE
    workdir: Path | None = None
    prefix: str = field(default_factory=new_prefix)
    fleet_id: str = ""
    dead_after_s: float = 2.0
    #: torch threads per agent: the box's cores are shared by every agent.
    agent_threads: int = 1
    measure_s: float = 0.3
    #: Whether the coordinator's own sends share the medium. Off, the client's inputs reach the
    #: first stage unshaped, as in a scenario where the data starts on that device.
    shape_coordinator: bool = True
    extra_agent_env: Mapping[str, str] = field(default_factory=dict)
    #: One-way delay (ms) every LAN hop adds, and its jitter: a userspace forwarder on each
    #: host's link, the coordinator's included (doramesh.testing.delay). None: no forwarders.
    latency_ms: float | None = None
    jitter_ms: float = 0.0
    #: Keepalive timeout of every daemon (``DORAMESH_KEEPALIVE_TIMEOUT_S``); None: the default.
    #: A dilated run slows every link, so ``from_scenario`` scales it with the dilation.
    keepalive_timeout_s: float | None = None

    def __post_init__(self) -> None:
        self.fleet_id = self.fleet_id or self.prefix
        self.lan: Lan | None = None
        self.daemons: dict[str, Daemon] = {}
        self.coordinator_address = ""
        self._host_names = {h.node_id: f"h{i}" for i, h in enumerate(self.hosts)}
        self._own_workdir = self.workdir is None
        self._compose: dict[str, ComposeService] = {}

    @classmethod
    def from_scenario(cls, scenario: Any, *, dilation: float = 1.0, **kwargs: Any) -> Testbed:
        """One host per scenario device (emulating its catalogue class), the scenario's
        network shaped at ``1/dilation`` of its rates. Devices without a class are refused:
        an agent can only emulate a catalogue device."""
        from doramesh.agent.catalogue import CATALOGUE

        custom = [d.node_id for d in scenario.devices if d.device_class not in CATALOGUE]
        if custom:
            raise ValueError(f"agents emulate catalogue classes; {custom} have none")
        from doramesh.channels import KEEPALIVE_TIMEOUT_S

        net = scenario.network
        if dilation > 1:
            kwargs.setdefault("keepalive_timeout_s", KEEPALIVE_TIMEOUT_S * dilation)
        return cls(
            [HostSpec(d.node_id, d.device_class) for d in scenario.devices],
            shared_mbps=net.bandwidth_mbps / dilation if net.kind == "shared" else None,
            link_mbps={(lk.a, lk.b): lk.bandwidth_mbps / dilation for lk in net.links},
            planner_network_mbps=net.bandwidth_mbps,
            planner_network_latency_ms=net.latency_ms,
            **kwargs,
        )

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self, *, timeout: float = 120.0) -> Self:
        reason = why_unavailable(need_iptables=False)
        if reason is not None:
            raise NetnsUnavailable(reason)
        atexit.register(self.down)
        try:
            self._up(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._compose = load_compose(self.compose_file)
        lan = self.lan = Lan(self.prefix, free_subnet())
        lan.create()
        lan.add_host("co")
        for host in self.hosts:
            lan.add_host(self._host_names[host.node_id])
        if self.latency_ms is not None:
            self._start_forwarders(lan, DelaySpec(self.latency_ms, self.jitter_ms))
        lan.route_from_root("co")
        if self.shared_mbps is not None:
            lan.shared_medium(
                self.shared_mbps,
                exempt=() if self.shape_coordinator else ("co",),
                queue_s=self.shared_queue_s,
            )
        if self.link_mbps:
            lan.link_rates(
                {
                    (self._host_names[a], self._host_names[b]): r
                    for (a, b), r in self.link_mbps.items()
                }
            )
        co = lan.hosts["co"]
        self.coordinator_address = f"{co.address}:{COORDINATOR_PORT}"
        for name in start_order(self._compose, ("coordinator",)):
            self._start_service(name, co.ns, self._service_env(name, co.address))
            self._wait_healthy(name, co.ns, deadline)
        for host in self.hosts:
            self.start_agent(host.node_id)
        self.wait_for_agents([h.node_id for h in self.hosts], deadline - time.monotonic())

    def down(self) -> None:
        """Stop every daemon and remove every namespace and link of this run. Idempotent."""
        atexit.unregister(self.down)
        for daemon in self.daemons.values():
            if daemon.alive():
                assert daemon.process is not None
                daemon.process.send_signal(signal.SIGTERM)
        for daemon in self.daemons.values():
            if daemon.process is not None:
                try:
                    daemon.process.wait(5)
                except subprocess.TimeoutExpired:
                    daemon.process.kill()
                    daemon.process.wait(5)
        remove_prefix(self.prefix)
        (STATE_DIR / f"{self.prefix}.json").unlink(missing_ok=True)
        if (
            self._own_workdir
            and self.workdir is not None
            and not os.environ.get("DORAMESH_TESTBED_KEEP")
        ):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- daemons ---------------------------------------------------------------------------
    def _start_forwarders(self, lan: Lan, spec: DelaySpec) -> None:
        """A delay forwarder on every host's link (daemon ``delay-<node id>``/``delay-co``)."""
        assert self.workdir is not None
        node_ids = {name: node_id for node_id, name in self._host_names.items()}
        for seed, name in enumerate(list(lan.hosts)):
            daemon_name = f"delay-{node_ids.get(name, name)}"
            log = self.workdir / f"{daemon_name}.log"
            proc = start_forwarder(lan, name, spec, seed=seed, log=log)
            argv = cast(list[str], proc.args)
            self.daemons[daemon_name] = Daemon(daemon_name, lan.bridge_ns, argv, {}, log, proc)

    def _path_env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DORAMESH_")}
        env["PATH"] = f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}"
        env["PYTHONUNBUFFERED"] = "1"
        # The testbed's fleet is plaintext: the test process is its client and holds no fleet
        # credentials. Every daemon (and compose's health check) gets the same setting.
        env["DORAMESH_INSECURE"] = "1"
        env["DORAMESH_STATE_DIR"] = str(self.workdir / "state") if self.workdir else ""
        if self.keepalive_timeout_s is not None:
            env["DORAMESH_KEEPALIVE_TIMEOUT_S"] = f"{self.keepalive_timeout_s:g}"
        return env

    def _service_env(self, name: str, lan_address: str) -> dict[str, str]:
        env = dict(self._compose[name].environment)
        env["DORAMESH_FLEET_ID"] = self.fleet_id
        env["DORAMESH_MDNS_INTERFACES"] = lan_address
        env["DORAMESH_LOG_JSON"] = "1"
        if name == "coordinator":
            # compose.yaml asks for this box's LAN address here.
            env["DORAMESH_COORDINATOR_ADVERTISE_HOST"] = lan_address
            env["DORAMESH_DEAD_AFTER_S"] = str(self.dead_after_s)
            if self.planner_network_mbps is not None:
                env["DORAMESH_NETWORK_MBPS"] = str(self.planner_network_mbps)
            if self.planner_network_latency_ms is not None:
                env["DORAMESH_NETWORK_LATENCY_MS"] = str(self.planner_network_latency_ms)
        return env

    def _start_service(self, name: str, ns: str, env: Mapping[str, str]) -> Daemon:
        assert self.workdir is not None
        svc = self._compose[name]
        daemon = Daemon(
            name, ns, list(svc.command), {**self._path_env(), **env}, self.workdir / f"{name}.log"
        )
        self._spawn(daemon)
        return daemon

    def _spawn(self, daemon: Daemon) -> None:
        with daemon.log.open("ab") as out:
            daemon.process = subprocess.Popen(
                ns_argv(daemon.ns, daemon.argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=daemon.env,
                start_new_session=True,
            )
        self.daemons[daemon.name] = daemon

    def _wait_healthy(self, name: str, ns: str, deadline: float) -> None:
        """compose's ``service_healthy``: its health check, run in the service's namespace."""
        check = self._compose[name].healthcheck
        daemon = self.daemons[name]
        while True:
            if not daemon.alive():
                raise RuntimeError(f"{name} exited:\n{self.log_tail(name)}")
            if check is not None:
                proc = subprocess.run(
                    ns_argv(ns, list(check)), env=self._path_env(), capture_output=True, timeout=30
                )
                if proc.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not healthy in time:\n{self.log_tail(name)}")
            time.sleep(0.3)

    def agent_ns(self, node_id: str) -> str:
        assert self.lan is not None
        return self.lan.hosts[self._host_names[node_id]].ns

    def agent_address(self, node_id: str) -> str:
        assert self.lan is not None
        return f"{self.lan.hosts[self._host_names[node_id]].address}:{AGENT_PORT}"

    def start_agent(self, node_id: str) -> Daemon:
        """Start (or restart) the agent of ``node_id`` with compose's agent command."""
        assert self.lan is not None and self.workdir is not None
        spec = next(h for h in self.hosts if h.node_id == node_id)
        host = self.lan.hosts[self._host_names[node_id]]
        svc = self._compose["agent"]
        env = dict(svc.environment)
        env.update(
            {
                "DORAMESH_AGENT_ADVERTISE_HOST": host.address,
                "DORAMESH_NODE_ID": node_id,
                "DORAMESH_CACHE_DIR": str(self.workdir / f"cache-{node_id}"),
                "DORAMESH_FLEET_ID": self.fleet_id,
                "DORAMESH_MDNS_INTERFACES": host.address,
                "DORAMESH_THREADS": str(self.agent_threads),
                "DORAMESH_MEASURE_S": str(self.measure_s),
                "DORAMESH_LOG_JSON": "1",
                **self.extra_agent_env,
            }
        )
        if spec.device_class:
            env["DORAMESH_EMULATE"] = spec.device_class
        old = self.daemons.get(f"agent-{node_id}")
        if old is not None and old.alive():
            raise RuntimeError(f"agent {node_id} is already running")
        daemon = Daemon(
            f"agent-{node_id}",
            host.ns,
            list(svc.command),
            {**self._path_env(), **env},
            self.workdir / f"agent-{node_id}.log",
        )
        self._spawn(daemon)
        return daemon

    def kill_agent(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Kill an agent's process abruptly: no drain, no mDNS goodbye."""
        daemon = self.daemons[f"agent-{node_id}"]
        if daemon.process is not None and daemon.alive():
            daemon.process.send_signal(sig)
            daemon.process.wait(10)

    def wait_for_agents(
        self, node_ids: Sequence[str], timeout: float, *, state: str = "alive"
    ) -> None:
        """Wait until the coordinator reports every one of ``node_ids`` in ``state``."""
        from doramesh.errors import DoraMeshError
        from doramesh.sdk import Client

        deadline = time.monotonic() + timeout
        want = set(node_ids)
        seen: dict[str, str] = {}
        with Client(self.coordinator_address, timeout=5) as client:
            while True:
                try:
                    seen = {a.profile.node_id: a.state for a in client.fleet()}
                except DoraMeshError:
                    seen = {}
                if all(seen.get(n) == state for n in want):
                    return
                for node_id in want:
                    d = self.daemons.get(f"agent-{node_id}")
                    if state == "alive" and d is not None and not d.alive():
                        raise RuntimeError(f"agent {node_id} exited:\n{self.log_tail(d.name)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"coordinator sees {seen}, waiting for {sorted(want)} {state}:\n"
                        f"{self.log_tail('coordinator')}"
                    )
                time.sleep(0.2)

    # -- dynamics --------------------------------------------------------------------------
    def set_bandwidth(self, rate_mbps: float) -> None:
        """The shared medium's rate, or every shaped link's (a scenario's ``bandwidth_mbps``)."""
        assert self.lan is not None
        if self.shared_mbps is not None:
            self.lan.set_shared_rate(rate_mbps)
        for a, b in self.link_mbps:
            self.lan.set_link_rate(self._host_names[a], self._host_names[b], rate_mbps)

    def cut(self, node_id: str) -> None:
        assert self.lan is not None
        self.lan.cut(self._host_names[node_id])

    def heal(self, node_id: str) -> None:
        assert self.lan is not None
        self.lan.heal(self._host_names[node_id])

    def loss(self, node_id: str, probability: float) -> None:
        """Drop a random ``probability`` of the packets the host receives (iptables)."""
        assert self.lan is not None
        self.lan.loss(self._host_names[node_id], probability)

    def clear_loss(self, node_id: str, probability: float) -> None:
        assert self.lan is not None
        self.lan.clear_loss(self._host_names[node_id], probability)

    def slow(self, node_id: str, factor: float, *, timeout: float = 5.0) -> None:
        """The agent computes ``factor`` times slower (its pacing fault hook)."""
        from doramesh.channels import create_sync_channel
        from doramesh.v1 import agent_pb2, agent_pb2_grpc

        with create_sync_channel(self.agent_address(node_id)) as channel:
            agent_pb2_grpc.AgentStub(channel).SetSlowdown(
                agent_pb2.SetSlowdownRequest(slowdown=factor), timeout=timeout
            )

    def tx_bytes(self, node_id: str) -> int:
        """Bytes this host has sent on the LAN (its eth0 counter)."""
        out = subprocess.run(
            ns_argv(self.agent_ns(node_id), ["cat", "/sys/class/net/eth0/statistics/tx_bytes"]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.strip())

    # -- reporting -------------------------------------------------------------------------
    def log_tail(self, name: str, lines: int = 40) -> str:
        daemon = self.daemons.get(name)
        if daemon is None or not daemon.log.exists():
            return f"(no log for {name})"
        return "\n".join(daemon.log.read_text(errors="replace").splitlines()[-lines:])

    def state(self) -> dict[str, object]:
        assert self.lan is not None
        return {
            "prefix": self.prefix,
            "coordinator": self.coordinator_address,
            "fleet_id": self.fleet_id,
            "workdir": str(self.workdir),
            "hosts": {
                h.node_id: {
                    "class": h.device_class,
                    "namespace": self.agent_ns(h.node_id),
                    "address": self.agent_address(h.node_id),
                }
                for h in self.hosts
            },
            "daemons": {
                d.name: {"ns": d.ns, "pid": d.process.pid if d.process else None, "log": str(d.log)}
                for d in self.daemons.values()
            },
        }

    def save_state(self) -> Path:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        path = STATE_DIR / f"{self.prefix}.json"
        path.write_text(json.dumps(self.state(), indent=2))
        return path

    def detach(self) -> None:
        """Leave the testbed running after this process exits (``testbed up``)."""
        atexit.unregister(self.down)
