"""LocalFleet (in-process) and SubprocessFleet (one OS process per daemon).

Both are secure by default, like a real fleet: each makes an ephemeral fleet CA in a temporary
directory, gives every service and agent a certificate for its own identity, and makes this
process a client of the fleet (an app certificate as the default credentials of ``channels``,
so ``Client(fleet.address)`` just works). ``secure=False`` runs everything plaintext, for
development, and says so in the logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from doramesh import channels
from doramesh.agent.config import DEFAULT_MAX_INFLIGHT_MICROBATCHES, AgentSettings
from doramesh.agent.server import AgentServer
from doramesh.coordinator.config import DEFAULT_MAX_INFLIGHT_REQUESTS, CoordinatorSettings
from doramesh.coordinator.server import CoordinatorServer
from doramesh.planner.servicer import PlannerServer
from doramesh.security.authority import FleetAuthority
from doramesh.security.credentials import Credentials, save_node_credentials
from doramesh.security.identity import Identity, Role

#: Device classes the demo's agents emulate, in order: a mixed home/edge fleet.
DEFAULT_CLASSES = ("raspberry-pi-5", "jetson-orin-nano", "raspberry-pi-4", "mini-pc", "pixel-8")
LOOPBACK = ("127.0.0.1",)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    """Wait on a condition, not a sleep; raise TimeoutError naming the condition."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


async def wait_for_async(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


@dataclass
class LocalFleet:
    """Planner + coordinator + agents in this process, on loopback, found by real mDNS."""

    classes: Sequence[str | None] = DEFAULT_CLASSES[:3]
    mdns: bool = True
    measure_s: float = 0.3
    memory_limit_mb: int | None = None
    cache_dir: Path | None = None
    #: A fresh fleet id per fleet, so fleets started side by side on one host (tests, demos)
    #: never admit each other's agents from the shared loopback mDNS.
    fleet_id: str = field(default_factory=lambda: f"local-{uuid.uuid4().hex[:8]}")
    dead_after_s: float = 5.0
    #: Load shedding limits, e.g. low to test RESOURCE_EXHAUSTED.
    max_inflight_requests: int = DEFAULT_MAX_INFLIGHT_REQUESTS
    max_inflight_microbatches: int = DEFAULT_MAX_INFLIGHT_MICROBATCHES
    planner: PlannerServer | None = None
    coordinator: CoordinatorServer | None = None
    agents: list[AgentServer] = field(default_factory=list)
    #: Mutual TLS with an ephemeral fleet CA (the default); False: plaintext, development only.
    secure: bool = True
    #: The fleet's CA and token secret (secure fleets), e.g. to issue join or app tokens.
    authority: FleetAuthority | None = None
    #: What this process presents to the fleet: an app certificate (secure fleets).
    credentials: Credentials | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _ca_tmp: tempfile.TemporaryDirectory[str] | None = None
    _previous_default: Credentials | None = None
    _default_set: bool = False

    def issue(self, role: Role, name: str) -> Credentials | None:
        """Credentials signed by this fleet's CA for ``name`` in ``role`` (None if insecure)."""
        if self.authority is None:
            return None
        return Credentials.issued_by(self.authority.ca, Identity(self.fleet_id, role, name))

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            # Stop what did start and give back this process's default credentials.
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def address(self) -> str:
        assert self.coordinator is not None
        return self.coordinator.address

    async def start(self, *, timeout: float = 30.0) -> None:
        if self.cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="doramesh-fleet-")
            self.cache_dir = Path(self._tmp.name)
        if self.secure:
            self.authority, self._ca_tmp = FleetAuthority.ephemeral(self.fleet_id)
            self.credentials = self.issue("app", "local-client")
        self._previous_default = channels.set_default_credentials(self.credentials)
        self._default_set = True
        self.planner = PlannerServer("127.0.0.1:0")
        with channels.acting_as(self.issue("planner", "planner")):
            planner_address = await self.planner.start()
        agents = [
            AgentServer(
                AgentSettings(
                    listen="127.0.0.1:0",
                    node_id=f"{cls or 'host'}-{i}",
                    emulate=cls,
                    memory_limit_mb=self.memory_limit_mb,
                    fleet_id=self.fleet_id,
                    mdns_interfaces=LOOPBACK,
                    announce=self.mdns,
                    cache_dir=self.cache_dir / f"agent-{i}",
                    measure_s=self.measure_s,
                    max_inflight_microbatches=self.max_inflight_microbatches,
                ),
                credentials=self.issue("agent", f"{cls or 'host'}-{i}"),
            )
            for i, cls in enumerate(self.classes)
        ]
        # Profiling is CPU-bound: measure one agent at a time so they do not skew each other.
        for agent in agents:
            await agent.start()
            self.agents.append(agent)
        self.coordinator = CoordinatorServer(
            CoordinatorSettings(
                listen="127.0.0.1:0",
                planner=planner_address,
                static_agents=() if self.mdns else tuple(a.address for a in agents),
                browse=self.mdns,
                mdns_interfaces=LOOPBACK,
                fleet_id=self.fleet_id,
                # In-process agents share one event loop with their own compute: give a busy
                # agent longer before calling it dead than a device of its own would need.
                dead_after_s=self.dead_after_s,
                enrol_listen="127.0.0.1:0",
                max_inflight_requests=self.max_inflight_requests,
            ),
            credentials=self.issue("coordinator", "coordinator"),
            authority=self.authority,
        )
        await self.coordinator.start()
        await self.wait_for_agents(len(agents), timeout=timeout)

    async def wait_for_agents(self, n: int, *, timeout: float = 30.0) -> None:
        coordinator = self.coordinator
        assert coordinator is not None
        await wait_for_async(lambda: len(coordinator.registry.alive()) >= n, timeout)

    async def kill_agent(self, index: int) -> None:
        """Stop an agent abruptly: no drain, no mDNS goodbye reaches anyone in time."""
        await self.agents[index].stop(grace=0)

    async def stop(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.stop(grace=0.5)
        for agent in self.agents:
            await agent.stop(grace=0.5)
        if self.planner is not None:
            await self.planner.stop(0.5)
        if self._tmp is not None:
            self._tmp.cleanup()
        if self._ca_tmp is not None:
            self._ca_tmp.cleanup()
        if self._default_set:
            channels.set_default_credentials(self._previous_default)
            self._default_set = False


@dataclass
class DaemonProcess:
    name: str
    process: subprocess.Popen[bytes]
    address: str
    log: Path
    #: The command line after ``doramesh`` (without ``--ready-file``), to restart it.
    args: tuple[str, ...] = ()


class SubprocessFleet:
    """The daemons as separate OS processes started through the CLI (``doramesh agent`` etc.).

    Each daemon binds port 0 and writes its bound address to a ``--ready-file``; nothing is
    shared between the processes but the network.
    """

    def __init__(
        self,
        classes: Sequence[str] = DEFAULT_CLASSES[:3],
        *,
        workdir: Path,
        mdns: bool = True,
        env: dict[str, str] | None = None,
        secure: bool = True,
    ) -> None:
        self.classes = classes
        self.workdir = workdir
        self.mdns = mdns
        self.secure = secure
        #: The fleet CA's state dir (secure fleets), passed to the planner and coordinator.
        self.state_dir = workdir / "fleet-state"
        self.authority: FleetAuthority | None = None
        self.credentials: Credentials | None = None
        self._previous_default: Credentials | None = None
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.daemons: dict[str, DaemonProcess] = {}
        self.fleet_id = f"procs-{uuid.uuid4().hex[:8]}"

    def _start(self, name: str, args: list[str], timeout: float) -> DaemonProcess:
        ready = self.workdir / f"{name}.ready"
        log = self.workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "doramesh", *args, "--ready-file", str(ready)]
        ready.unlink(missing_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{name} not ready in {timeout} s:\n{log.read_text()}")
            time.sleep(0.05)
        address = json.loads(ready.read_text())["address"]
        daemon = DaemonProcess(name, proc, address, log, tuple(args))
        self.daemons[name] = daemon
        return daemon

    def start(self, timeout: float = 60.0) -> str:
        """Start everything; returns the coordinator's address."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        loopback = ["--mdns-interface", "127.0.0.1", "--fleet-id", self.fleet_id]
        # The state dir holds the coordinator's jobs too: never the user's own, even insecure.
        security = ["--insecure", "--state-dir", str(self.state_dir)]
        if self.secure:
            if self.authority is None:
                self.authority = FleetAuthority.init(self.state_dir, self.fleet_id)
            security = ["--state-dir", str(self.state_dir)]
            self.credentials = Credentials.issued_by(
                self.authority.ca, Identity(self.fleet_id, "app", "test-client")
            )
            self._previous_default = channels.set_default_credentials(self.credentials)
        planner = self._start("planner", ["planner", "--listen", "127.0.0.1:0", *security], timeout)
        agents = []
        for i, cls in enumerate(self.classes):
            node_id = f"{cls}-{i}"
            args = ["agent", "--listen", "127.0.0.1:0", "--node-id", node_id]
            args += ["--emulate", cls, "--cache-dir", str(self.workdir / f"cache-{i}"), *loopback]
            args += self._agent_security(node_id, i)
            if not self.mdns:
                args.append("--no-announce")
            agents.append(self._start(f"agent-{i}", args, timeout))
        args = ["coordinator", "--listen", "127.0.0.1:0", "--planner", planner.address, *loopback]
        args += [*security, "--enrol-listen", "127.0.0.1:0"]
        if not self.mdns:
            args.append("--no-browse")
            for agent in agents:
                args += ["--agent", agent.address]
        coordinator = self._start("coordinator", args, timeout)
        return coordinator.address

    def _agent_security(self, node_id: str, index: int) -> list[str]:
        """An agent's state dir holding a certificate for its node id, signed by the fleet CA
        (the enrolment RPC itself is exercised by tests/integration/test_auth.py)."""
        if self.authority is None:
            return ["--insecure"]
        state = self.workdir / f"agent-{index}-state"
        identity = Identity(self.fleet_id, "agent", node_id)
        save_node_credentials(state, Credentials.issued_by(self.authority.ca, identity))
        return ["--state-dir", str(state)]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.daemons[name].process.send_signal(sig)

    def restart(self, name: str, timeout: float = 60.0) -> DaemonProcess:
        """Start daemon ``name`` again with the same arguments, state dir and listen address
        (killed first if it still runs), as a supervisor would; returns it once it is ready."""
        old = self.daemons[name]
        if old.process.poll() is None:
            old.process.kill()
        old.process.wait(10)
        args = list(old.args)
        if "--listen" in args:
            args[args.index("--listen") + 1] = old.address
        return self._start(name, args, timeout)

    def stop(self) -> None:
        for daemon in self.daemons.values():
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
        for daemon in self.daemons.values():
            try:
                daemon.process.wait(10)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait(5)
        if self.credentials is not None:
            channels.set_default_credentials(self._previous_default)
            self.credentials = None

    def logs(self) -> str:
        return "\n".join(f"--- {d.name}\n{d.log.read_text()}" for d in self.daemons.values())
