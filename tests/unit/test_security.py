"""The fleet CA, tokens, identities and the authorisation table, without sockets."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from cryptography import x509

from doramesh.errors import FailedPrecondition, InvalidArgument, Status, Unauthenticated
from doramesh.security import authz, tokens
from doramesh.security.authority import FleetAuthority
from doramesh.security.ca import (
    CA_KEY,
    TOKEN_KEY,
    USED_TOKENS,
    FleetCA,
    cert_pem,
    make_csr,
    new_key,
)
from doramesh.security.credentials import (
    Credentials,
    identity_of,
    load_node_credentials,
    save_node_credentials,
    service_credentials,
)
from doramesh.security.identity import MEMBER_DNS, Identity, parse_uri, server_name


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_fleet_init_writes_secrets_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    authority = FleetAuthority.init(state, "home")
    assert _mode(state) == 0o700
    for name in (CA_KEY, TOKEN_KEY, "ca.pem", "fleet.json"):
        assert _mode(state / name) == 0o600, name
    assert FleetAuthority.load(state).ca.fingerprint == authority.ca.fingerprint
    with pytest.raises(FailedPrecondition):
        FleetAuthority.init(state, "home")  # never overwrites a fleet's CA


def test_identity_uri_round_trips_and_rejects_foreign_names() -> None:
    agent = Identity("home", "agent", "pi-1")
    assert agent.uri == "doramesh://fleet/home/node/pi-1"
    assert parse_uri(agent.uri) == agent
    assert parse_uri(Identity("home", "app", "dash").uri) == Identity("home", "app", "dash")
    for bad in (
        "spiffe://home/node/pi-1",
        "doramesh://fleet/home/root/x",
        "doramesh://fleet//node/a",
    ):
        assert parse_uri(bad) is None
    with pytest.raises(ValueError):
        Identity("home", "agent", "../etc")
    # Every node id maps to one DNS label; different ids never share one.
    assert server_name("agent", "Pi.1") != server_name("agent", "pi.1")
    assert agent.dns_names == (server_name("agent", "pi-1"), MEMBER_DNS)
    assert Identity("home", "app", "dash").dns_names == ()


def test_csr_is_signed_for_the_identity_given_not_the_one_asked() -> None:
    ca = FleetCA.create("home")
    csr = make_csr(new_key(), "coordinator")  # a device asking for a grander name
    cert = ca.sign_csr(csr, Identity("home", "agent", "pi-1"))
    assert identity_of(cert_pem(cert)) == Identity("home", "agent", "pi-1")
    cert.verify_directly_issued_by(ca.cert)
    with pytest.raises(InvalidArgument):
        ca.sign_csr(b"not a csr", Identity("home", "agent", "pi-1"))
    with pytest.raises(InvalidArgument):
        ca.sign(new_key().public_key(), Identity("other-fleet", "agent", "pi-1"))


def test_app_certificates_are_client_only() -> None:
    ca = FleetCA.create("home")
    _, pem = ca.issue(Identity("home", "app", "dash"))
    usage = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage
    )
    assert list(usage.value) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]


def test_tokens_verify_and_refuse_tampering_expiry_and_kind() -> None:
    secret = b"s" * 32
    claims = tokens.new_claims("join", fleet_id="home", ca_fingerprint="ab", ttl_s=60)
    token = tokens.issue(secret, claims)
    assert tokens.verify(secret, token, "join") == claims
    assert tokens.peek(token) == claims
    prefix, body, mac = token.split(".")
    forged_body = tokens._b64(tokens._unb64(body).replace(b'"join"', b'"app"'))
    for bad in (f"{prefix}.{forged_body}.{mac}", token[:-2], "x", "a.b.c", "." * 3000):
        with pytest.raises(Unauthenticated):
            tokens.verify(secret, bad, "join")
    with pytest.raises(Unauthenticated, match="signature"):
        tokens.verify(b"t" * 32, token, "join")
    with pytest.raises(Unauthenticated, match="join token cannot"):
        tokens.verify(secret, token, "app")
    with pytest.raises(Unauthenticated, match="expired"):
        tokens.verify(secret, token, "join", now=claims.expires_at)


def test_join_token_is_one_time_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    authority = FleetAuthority.init(state, "home")
    token = authority.join_token()
    identity, _ = authority.enrol(token, "pi-1", make_csr(new_key(), "pi-1"))
    assert identity == Identity("home", "agent", "pi-1")
    assert _mode(state / USED_TOKENS) == 0o600
    with pytest.raises(Unauthenticated, match="already used"):
        authority.enrol(token, "pi-2", make_csr(new_key(), "pi-2"))
    restarted = FleetAuthority.load(state)
    with pytest.raises(Unauthenticated, match="already used"):
        restarted.check_join(token)


def test_a_bad_csr_does_not_burn_the_token(tmp_path: Path) -> None:
    authority = FleetAuthority.init(tmp_path / "s", "home")
    token = authority.join_token()
    with pytest.raises(InvalidArgument):
        authority.enrol(token, "pi-1", b"garbage")
    authority.enrol(token, "pi-1", make_csr(new_key(), "pi-1"))


def test_token_bound_to_a_node_id(tmp_path: Path) -> None:
    authority = FleetAuthority.init(tmp_path / "s", "home")
    token = authority.join_token(node_id="pi-7")
    with pytest.raises(InvalidArgument, match="pi-7"):
        authority.enrol(token, "pi-8", make_csr(new_key(), "pi-8"))
    identity, _ = authority.enrol(token, "", make_csr(new_key(), ""))
    assert identity.name == "pi-7"


def test_tokens_of_another_fleet_are_refused(tmp_path: Path) -> None:
    ours = FleetAuthority.init(tmp_path / "a", "home")
    theirs = FleetAuthority.init(tmp_path / "b", "home")
    with pytest.raises(Unauthenticated):
        ours.check_join(theirs.join_token())
    with pytest.raises(Unauthenticated):
        ours.check_app(theirs.app_token())
    assert ours.check_app(ours.app_token(name="dash")) == Identity("home", "app", "dash")


def test_used_token_record_is_bounded() -> None:
    used = tokens.UsedTokens(None, max_entries=3)
    now = time.time()
    live = [tokens.new_claims("join", fleet_id="f", ca_fingerprint="x", ttl_s=60) for _ in range(3)]
    for claims in live:
        used.redeem(claims, now=now)
    with pytest.raises(Unauthenticated, match="too many"):
        used.redeem(tokens.new_claims("join", fleet_id="f", ca_fingerprint="x", ttl_s=60), now=now)
    # Once those tokens have expired their entries are dropped, and there is room again.
    later = now + 120
    used.redeem(tokens.new_claims("join", fleet_id="f", ca_fingerprint="x", ttl_s=600), now=later)
    assert len(used) == 1


def test_node_credentials_round_trip(tmp_path: Path) -> None:
    ca = FleetCA.create("home")
    creds = Credentials.issued_by(ca, Identity("home", "agent", "pi-1"))
    assert load_node_credentials(tmp_path) is None
    folder = save_node_credentials(tmp_path, creds)
    assert _mode(folder / "key.pem") == 0o600
    loaded = load_node_credentials(tmp_path)
    assert loaded is not None and loaded.identity == creds.identity
    assert "PRIVATE" not in repr(loaded)
    # A service next to the CA issues itself a certificate; elsewhere it uses the enrolled one.
    assert service_credentials(tmp_path, "planner").identity == creds.identity
    with pytest.raises(FailedPrecondition):
        service_credentials(tmp_path / "empty", "planner")


@pytest.mark.parametrize(
    ("method", "role", "refused"),
    [
        ("/doramesh.v1.Agent/Forward", "agent", None),
        ("/doramesh.v1.Agent/SyncGradients", "agent", None),
        ("/doramesh.v1.Agent/LoadStage", "agent", Status.PERMISSION_DENIED),
        ("/doramesh.v1.Agent/SetSlowdown", "agent", Status.PERMISSION_DENIED),
        ("/doramesh.v1.Agent/LoadStage", "coordinator", None),
        ("/doramesh.v1.Agent/LoadStage", "app", Status.PERMISSION_DENIED),
        ("/doramesh.v1.Agent/LoadStage", "planner", Status.PERMISSION_DENIED),
        ("/doramesh.v1.Coordinator/Infer", "app", None),
        ("/doramesh.v1.Coordinator/Infer", "agent", Status.PERMISSION_DENIED),
        ("/doramesh.v1.WeightStore/FetchStage", "agent", None),
        ("/doramesh.v1.WeightStore/FetchStage", "app", Status.PERMISSION_DENIED),
        ("/doramesh.v1.Planner/Plan", "coordinator", None),
        ("/doramesh.v1.Planner/Plan", "agent", Status.PERMISSION_DENIED),
        ("/grpc.health.v1.Health/Check", "app", None),
        ("/doramesh.v1.Enrolment/Enrol", "agent", Status.PERMISSION_DENIED),
        ("/grpc.reflection.v1.ServerReflection/Info", "coordinator", Status.PERMISSION_DENIED),
    ],
)
def test_authorisation_table(method: str, role: str, refused: Status | None) -> None:
    peer = Identity("home", role, "x")  # type: ignore[arg-type]
    decision = authz.decide_mtls(method, peer, "home")
    assert (decision.status if decision else None) == refused


def test_mtls_refuses_no_identity_and_other_fleets() -> None:
    assert authz.decide_mtls("/grpc.health.v1.Health/Check", None, "home") is not None
    other = Identity("elsewhere", "coordinator", "c")
    refusal = authz.decide_mtls("/doramesh.v1.Agent/GetProfile", other, "home")
    assert refusal is not None and refusal.status is Status.PERMISSION_DENIED


def test_token_port_needs() -> None:
    assert authz.token_kind("/grpc.health.v1.Health/Check") == ""
    assert authz.token_kind("/doramesh.v1.Enrolment/Enrol") == "join"
    assert authz.token_kind("/doramesh.v1.Coordinator/Fleet") == "app"
    assert authz.token_kind("/doramesh.v1.Agent/Forward") is None
    assert authz.token_kind("/doramesh.v1.WeightStore/FetchStage") is None


def test_daemon_credentials(tmp_path: Path) -> None:
    import argparse

    from doramesh.fleet_cli import daemon_credentials

    def args(state: Path, **kw: object) -> argparse.Namespace:
        base = {"insecure": False, "state_dir": state, "join_token": None, "enroll": None}
        return argparse.Namespace(**{**base, **kw})

    state = tmp_path / "ca"
    FleetAuthority.init(state, "home")
    assert daemon_credentials(args(state, insecure=True), "coordinator") is None
    coordinator = daemon_credentials(args(state), "coordinator")
    assert coordinator is not None and coordinator.identity == Identity(
        "home", "coordinator", "coordinator"
    )
    # An agent on the CA's own box gets its certificate without a token, and keeps it.
    agent = daemon_credentials(args(state), "agent", "box-agent")
    assert agent is not None and agent.identity == Identity("home", "agent", "box-agent")
    assert load_node_credentials(state) is not None
    # A device with neither enrolled credentials nor a token is told how to enrol.
    with pytest.raises(FailedPrecondition, match="--join-token"):
        daemon_credentials(args(tmp_path / "device"), "agent", "pi-1")
