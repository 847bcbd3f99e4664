"""The testbed itself: services started from compose.yaml, teardown by prefix, and the shaped
link's activation goodput (issue 5: at least 90% of the link's rate)."""

from __future__ import annotations

from doramesh.bench.fleet import link_goodput
from doramesh.testing.compose import load_compose
from doramesh.testing.netns import Lan, free_subnet, list_namespaces, new_prefix, remove_prefix
from doramesh.testing.testbed import Testbed


def test_services_run_compose_commands(testbed: Testbed) -> None:
    compose = load_compose()
    for name in ("planner", "coordinator"):
        daemon = testbed.daemons[name]
        assert daemon.argv == list(compose[name].command)
        assert daemon.alive()
        for key, value in compose[name].environment.items():
            if key not in {"DORAMESH_COORDINATOR_ADVERTISE_HOST"}:
                assert daemon.env[key] == value, key
    for host in testbed.hosts:
        assert testbed.daemons[f"agent-{host.node_id}"].argv == list(compose["agent"].command)


def test_down_by_prefix_removes_what_a_crashed_run_left() -> None:
    prefix = new_prefix()
    lan = Lan(prefix, free_subnet())
    try:
        lan.create()
        lan.add_host("a")
        lan.add_host("b")
        lan.route_from_root("a")
        assert len(list_namespaces(prefix)) == 3
    finally:
        removed = remove_prefix(prefix)
    assert list_namespaces(prefix) == []
    assert f"{prefix}-br" in removed


def test_activation_goodput_on_a_shaped_link_is_at_least_90_percent() -> None:
    result = link_goodput(rate_mbps=20.0, requests=20, warmup=5)
    assert result["goodput_ratio"] >= 0.90, result
    # and no more than the link can carry: the shaping is real
    assert result["goodput_ratio"] <= 1.0, result
