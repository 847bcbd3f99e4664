"""A dilated testbed gives its daemons a keepalive timeout slowed as much as its links."""

from __future__ import annotations

from pathlib import Path

from doramesh.channels import KEEPALIVE_TIMEOUT_S, _channel_options
from doramesh.scenario import load_scenario
from doramesh.testing.testbed import Testbed

SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "smart-home-assistant.yaml"


def test_from_scenario_scales_the_keepalive_timeout_with_the_dilation() -> None:
    scenario = load_scenario(SCENARIO)
    tb = Testbed.from_scenario(scenario, dilation=20.0)
    assert tb.keepalive_timeout_s == KEEPALIVE_TIMEOUT_S * 20
    assert tb._path_env()["DORAMESH_KEEPALIVE_TIMEOUT_S"] == f"{KEEPALIVE_TIMEOUT_S * 20:g}"
    undilated = Testbed.from_scenario(scenario)
    assert undilated.keepalive_timeout_s is None
    assert "DORAMESH_KEEPALIVE_TIMEOUT_S" not in undilated._path_env()


def test_channels_wait_the_keepalive_timeout_for_a_ping_answer() -> None:
    options = dict(_channel_options(1 << 20, None))
    assert options["grpc.keepalive_timeout_ms"] == int(KEEPALIVE_TIMEOUT_S * 1000)
    # longer than a 6.4 MB tensor takes on a 5 Mbit/s link (10 s)
    assert KEEPALIVE_TIMEOUT_S > 10
