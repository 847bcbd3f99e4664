"""Local fleets for the demo, the tests and SDK users.

``LocalFleet`` runs a planner, a coordinator and N agents in this process, each a real gRPC
server on 127.0.0.1, discovering each other by real mDNS bound to loopback.
``SubprocessFleet`` starts the same daemons as separate OS processes through the CLI, exactly
as ``compose.yaml`` and a LAN deployment do.
"""

from doramesh.testing.fleet import LocalFleet, SubprocessFleet, wait_for, wait_for_async

__all__ = ["LocalFleet", "SubprocessFleet", "wait_for", "wait_for_async"]
