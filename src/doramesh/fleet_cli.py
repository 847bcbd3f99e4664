"""The CLI's security side: ``doramesh fleet init | join-token | app-token``, the flags every
daemon and client tool takes (``--state-dir``, ``--insecure``, an agent's ``--join-token``), and
turning them into the credentials a process presents."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import structlog

from doramesh.errors import DoraMeshError, FailedPrecondition
from doramesh.security.authority import DEFAULT_APP_TTL_S, DEFAULT_JOIN_TTL_S, FleetAuthority
from doramesh.security.ca import FleetCA
from doramesh.security.credentials import (
    Credentials,
    default_state_dir,
    holds_ca,
    load_node_credentials,
    save_node_credentials,
    service_credentials,
)
from doramesh.security.identity import Identity, Role

ENV_PREFIX = "DORAMESH_"
INSECURE_WARNING = (
    "INSECURE MODE: no TLS and no authentication; any host on the network can join this fleet, "
    "read its data and run code on it. For development only."
)


def _env(name: str) -> str:
    return os.environ.get(ENV_PREFIX + name, "")


def add_security_flags(
    parser: argparse.ArgumentParser, *, agent: bool = False, coordinator: bool = False
) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(_env("STATE_DIR")) if _env("STATE_DIR") else default_state_dir(),
        help="where the fleet CA (coordinator's box) or this device's enrolled key and "
        f"certificate live (default {default_state_dir()}) [env {ENV_PREFIX}STATE_DIR]",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=_env("INSECURE").lower() in {"1", "true", "yes", "on"},
        help="plaintext gRPC, no authentication: development only, loudly logged "
        f"[env {ENV_PREFIX}INSECURE]",
    )
    if agent:
        parser.add_argument(
            "--join-token",
            default=_env("JOIN_TOKEN") or None,
            help="enrol with this one-time token (from `doramesh fleet join-token`) if the "
            f"state dir holds no certificate yet [env {ENV_PREFIX}JOIN_TOKEN]",
        )
        parser.add_argument(
            "--enroll",
            default=_env("ENROLL") or None,
            metavar="HOST:PORT",
            help=f"the coordinator's enrolment port (default port 7073) [env {ENV_PREFIX}ENROLL]",
        )
    if coordinator:
        parser.add_argument(
            "--enrol-listen",
            default=_env("COORDINATOR_ENROL_LISTEN") or "0.0.0.0:7073",
            help="host:port of the TLS port for enrolment and app tokens ('' for none) "
            f"[env {ENV_PREFIX}COORDINATOR_ENROL_LISTEN]",
        )


def add_fleet_admin(parser: argparse.ArgumentParser) -> None:
    """``doramesh fleet [show|init|join-token|app-token]``."""
    parser.add_argument(
        "action",
        nargs="?",
        default="show",
        choices=["show", "init", "join-token", "app-token"],
        help="show (default): the fleet a coordinator sees; init: create the fleet CA in the "
        "state dir; join-token: a one-time token to enrol one device; app-token: a bearer "
        "token for apps",
    )
    parser.add_argument(
        "--fleet-id", default=None, help="init: the new fleet's id (default random)"
    )
    parser.add_argument("--ttl-s", type=float, default=None, help="token lifetime, seconds")
    parser.add_argument("--node-id", default="", help="join-token: bind the token to this node id")
    parser.add_argument("--name", default="app", help="app-token: the app's name")
    parser.add_argument(
        "--token",
        default=_env("TOKEN") or None,
        help="show: authenticate with this app token (--coordinator is then the TLS port, "
        f"7073) [env {ENV_PREFIX}TOKEN]",
    )
    add_security_flags(parser)


def run_fleet_admin(args: argparse.Namespace) -> int:
    state: Path = args.state_dir
    try:
        if args.action == "init":
            fleet_id = args.fleet_id or f"fleet-{uuid.uuid4().hex[:8]}"
            authority = FleetAuthority.init(state, fleet_id)
            print(f"fleet {fleet_id}: CA created in {state}")
            print(f"CA fingerprint (sha256): {authority.ca.fingerprint}")
            return 0
        authority = FleetAuthority.load(state)
        if args.action == "join-token":
            ttl = DEFAULT_JOIN_TTL_S if args.ttl_s is None else args.ttl_s
            print(authority.join_token(ttl_s=ttl, node_id=args.node_id))
        else:
            ttl = DEFAULT_APP_TTL_S if args.ttl_s is None else args.ttl_s
            print(authority.app_token(ttl_s=ttl, name=args.name))
        return 0
    except DoraMeshError as err:
        print(f"doramesh fleet {args.action}: {err.message}", file=sys.stderr)
        return 1


def warn_insecure(role: str, *, echo: bool = False) -> None:
    """Log the insecure-mode warning; ``echo`` also prints it, for commands (the demo) whose
    log level hides warnings."""
    structlog.get_logger("security").warning(INSECURE_WARNING, role=role)
    if echo:
        print(f"doramesh {role}: WARNING: {INSECURE_WARNING}", file=sys.stderr)


def daemon_credentials(
    args: argparse.Namespace, role: Role, node_id: str = ""
) -> Credentials | None:
    """What a daemon presents: None (``--insecure``, loudly logged), the state dir's enrolled
    certificate, one enrolled now with ``--join-token``, or (next to the CA) a fresh one."""
    if args.insecure:
        warn_insecure(role)
        return None
    state: Path = args.state_dir
    if role != "agent":
        return service_credentials(state, role)
    creds = load_node_credentials(state)
    if creds is None and holds_ca(state) and node_id:
        # An agent on the CA's own box (the compose box) needs no token: the CA is right here.
        ca = FleetCA.load(state)
        creds = Credentials.issued_by(ca, Identity(ca.fleet_id, "agent", node_id))
        save_node_credentials(state, creds)
    if creds is None:
        if not args.join_token or not args.enroll:
            raise FailedPrecondition(
                f"this device is not enrolled ({state} holds no certificate): run it once with "
                "--join-token TOKEN --enroll COORDINATOR:7073 (or --insecure for development)"
            )
        from doramesh.security.enrolment import enrol_into

        creds = asyncio.run(enrol_into(state, args.enroll, args.join_token, node_id))
        structlog.get_logger("security").info(
            "enrolled", identity=str(creds.identity), state_dir=str(state)
        )
    return creds


def client_credentials(args: argparse.Namespace, address: str) -> Credentials | None:
    """What a client tool presents: an app token (CA pinned by the token), else the state
    dir's CA (a fresh app certificate) or enrolled certificate; None when ``--insecure`` or
    there are no credentials at all (the call then fails against a secure fleet)."""
    if getattr(args, "insecure", False):
        warn_insecure("client")
        return None
    token = getattr(args, "token", None)
    if token:
        from doramesh.security.enrolment import token_credentials

        return token_credentials(address, token)
    state: Path = getattr(args, "state_dir", None) or (
        Path(_env("STATE_DIR")) if _env("STATE_DIR") else default_state_dir()
    )
    if holds_ca(state):
        return service_credentials(state, "app", "cli")
    return load_node_credentials(state)


def ready_extra(daemon: Any) -> dict[str, str]:
    """Extra fields for a daemon's ready file: the coordinator's enrolment address."""
    enrol = getattr(daemon, "enrol_address", "")
    return {"enrol_address": enrol} if enrol else {}
