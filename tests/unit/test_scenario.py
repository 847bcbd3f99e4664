"""Scenario files: the shipped suite loads and plans, bad documents name their field, explicit
tables round-trip, and ``doramesh plan`` prints valid JSON."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog
import yaml

from doramesh.agent.catalogue import CATALOGUE
from doramesh.errors import FailedPrecondition, InvalidArgument, NotFound
from doramesh.plan_cli import qoe_misses, run_plan
from doramesh.planner import api
from doramesh.scenario import load_scenario, load_scenarios, scenario_to_dict
from doramesh.scenario_types import Scenario
from doramesh.types import MIB, PlanSet, QoESpec

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "scenarios"
FILES = sorted(SUITE.glob("*.yaml"))
ZOO = {"mlp-tiny", "resnet18", "resnet50", "vit-base", "gpt2-small", "gpt2-medium", "llama-1b"}

# A small valid document that the malformed cases below break one field at a time.
VALID = """
name: tiny
devices:
  - {id: a, class: raspberry-pi-4}
  - {id: b, gflops: 8, memory_mb: 3000, power_idle_w: 2.7, power_active_w: 6.4}
network: {kind: shared, bandwidth_mbps: 100, latency_ms: 3}
model:
  name: two-layers
  input_mb: 0.5
  layers:
    - {name: l0, gflops: 0.25, param_mb: 10, activation_mb: 0.5, workspace_mb: 1}
    - {name: l1, gflops: 0.5, param_mb: 20, activation_mb: 0.25, gflops_bwd: 0.75}
workload: {kind: inference, batch: 1, rate_rps: 2}
qoe: {objective: min_energy, latency_ms: 800, min_throughput_sps: null, energy_j_per_sample: null}
dynamics:
  - {at_s: 20, device: b, leave: true}
  - {at_s: 10, bandwidth_mbps: 40}
  - {at_s: 30, device: a, slowdown: 2.0}
  - {at_s: 40, device: b, join: true}
"""


def _quiet_plan(scenario: Scenario, qoe: QoESpec | None = None, max_plans: int = 4) -> PlanSet:
    """Plan without the planner's debug logs (unconfigured structlog prints them to stdout)."""
    with structlog.testing.capture_logs():
        return api.plan(
            list(scenario.devices),
            scenario.model,
            scenario.network,
            scenario.workload,
            scenario.qoe if qoe is None else qoe,
            max_plans=max_plans,
        )


# ---------------------------------------------------------------------------------------------
# The shipped suite


def test_suite_is_large_and_names_are_unique() -> None:
    assert len(FILES) >= 12
    scenarios = load_scenarios(SUITE)
    names = [s.name for s in scenarios]
    assert names == sorted(names)
    assert len(set(names)) == len(FILES)
    assert {s.qoe.objective for s in scenarios} == {"min_energy", "min_latency", "max_throughput"}
    assert {s.network.kind for s in scenarios} == {"shared", "links"}
    assert {s.workload.kind for s in scenarios} == {"inference", "training"}
    assert sum(1 for s in scenarios if s.dynamics) >= 3


BASES = [p for p in FILES if not p.stem.endswith("-dynamics")]
VARIANTS = [p for p in FILES if p.stem.endswith("-dynamics")]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_shipped_scenario_loads(path: Path) -> None:
    assert path.read_text().startswith("#"), "each file starts with a comment on its setting"
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.description
    assert scenario.zoo_model is None or scenario.zoo_model in ZOO
    for device in scenario.devices:
        assert device.device_class in CATALOGUE or device.device_class == "custom"


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.stem)
def test_shipped_scenario_plans(path: Path) -> None:
    scenario = load_scenario(path)
    plan_set = _quiet_plan(scenario)
    assert plan_set.plans
    for plan in plan_set.plans:
        assert not qoe_misses(plan, scenario.qoe)


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.stem)
def test_dynamics_variant_is_its_base_plus_events(path: Path) -> None:
    """So the variant's starting plans are the base's, which ``test_shipped_scenario_plans``
    already checks, and a bench can compare the two."""
    variant = load_scenario(path)
    base = load_scenario(SUITE / f"{path.stem.removesuffix('-dynamics')}.yaml")
    assert variant.dynamics and not base.dynamics
    assert (
        dataclasses.replace(variant, name=base.name, description=base.description, dynamics=())
        == base
    )
    kinds = {
        "bandwidth" if e.bandwidth_mbps else "leave" if e.leave else "join" if e.join else "slow"
        for e in variant.dynamics
    }
    assert kinds == {"bandwidth", "leave", "join", "slow"}
    assert any(e.slowdown is not None and 2 <= e.slowdown <= 3 for e in variant.dynamics)


@pytest.mark.parametrize("path", BASES, ids=lambda p: p.stem)
def test_shipped_bounds_bind(path: Path) -> None:
    """The point of the suite: its bounds bind, so a planner that ignores them is caught. At
    least one of the QoE-blind baselines misses a bound (or cannot place the model).

    (Checked against the baselines rather than the doramesh planner's own unbounded optimum,
    which moves whenever the planner improves.)"""
    from doramesh.errors import FailedPrecondition
    from doramesh.planner.baselines import BASELINES

    scenario = load_scenario(path)
    caught = []
    for name, planner in BASELINES.items():
        try:
            plan_set = planner(
                scenario.devices,
                scenario.model,
                scenario.network,
                scenario.workload,
                scenario.qoe,
            )
        except FailedPrecondition:
            caught.append(name)
            continue
        if qoe_misses(plan_set.plans[0], scenario.qoe):
            caught.append(name)
    assert caught, "every QoE-blind baseline meets this scenario's bounds"


def test_large_models_exceed_every_device() -> None:
    """At least one scenario's model is bigger than any of its devices may hold."""
    too_big = [
        s.name
        for s in load_scenarios(SUITE)
        if sum(layer.param_bytes for layer in s.model.layers)
        > max(d.memory_bytes for d in s.devices)
    ]
    assert "smart-home-llama" in too_big
    assert "orchard-audio-custom" in too_big


def test_explicit_table_loads_without_torch() -> None:
    code = (
        "import sys; from doramesh.scenario import load_scenario; "
        f"load_scenario({str(SUITE / 'orchard-audio-custom.yaml')!r}); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Reading a document


def test_valid_document_values() -> None:
    s = load_scenario(VALID)
    a, b = s.devices
    pi4 = CATALOGUE["raspberry-pi-4"]
    assert (a.device_class, a.gflops, a.memory_bytes) == (
        "raspberry-pi-4",
        11.8,
        pi4.usable_memory_bytes,
    )
    assert a.power_source == "catalogue" and a.battery_wh == 0.0 and a.node_id == "a"
    assert a.address == ""
    assert (b.device_class, b.memory_bytes, b.power_tx_w, b.cores) == ("custom", 3000 * MIB, 0.0, 1)
    assert b.power_source == "scenario"
    assert s.model.model == "two-layers" and s.model.input_bytes == MIB // 2
    assert s.model.layers[0].workspace_bytes == MIB
    assert s.model.layers[0].backward_gflops == 0.5  # twice the forward by default
    assert s.model.layers[1].backward_gflops == 0.75
    assert s.zoo_model is None
    # Stored sorted by time.
    assert [e.at_s for e in s.dynamics] == [10, 20, 30, 40]
    assert s.dynamics[0].bandwidth_mbps == 40 and s.dynamics[0].device is None
    assert s.dynamics[1].leave and s.dynamics[3].join and s.dynamics[2].slowdown == 2.0


def test_explicit_figures_override_the_class() -> None:
    text = VALID.replace(
        "{id: a, class: raspberry-pi-4}",
        "{id: a, class: raspberry-pi-4, memory_mb: 1024, power_idle_w: 1.0}",
    )
    a = load_scenario(text).devices[0]
    assert a.memory_bytes == 1024 * MIB and a.power_idle_w == 1.0
    assert a.gflops == CATALOGUE["raspberry-pi-4"].gflops
    assert a.power_source == "scenario"


def test_links_network() -> None:
    text = VALID.replace(
        "network: {kind: shared, bandwidth_mbps: 100, latency_ms: 3}",
        "network: {kind: links, links: [{a: a, b: b, bandwidth_mbps: 50, latency_ms: 5}]}",
    )
    network = load_scenario(text).network
    assert network.kind == "links"
    assert network.link(network.links[0].b, network.links[0].a) == (50, 5)


def _replace(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (VALID + "colour: blue\n", "colour: unknown key"),
        (
            _replace("power_idle_w: 2.7,", "power_idle: 2.7,"),
            r"devices\[1\]\.power_idle: unknown key",
        ),
        (
            _replace("class: raspberry-pi-4", "class: raspberry-pi-9"),
            r"devices\[0\]\.class: unknown device class",
        ),
        (_replace("gflops: 8,", "gflops: -1,"), r"devices\[1\]\.gflops: must be > 0, got -1"),
        (_replace("gflops: 8,", "gflops: true,"), r"devices\[1\]\.gflops: must be a number"),
        (
            _replace("gflops: 8, ", ""),
            r"devices\[1\]\.gflops: required for a device without a class",
        ),
        (
            _replace("{id: b,", "{id: a,"),
            r"devices\[1\]\.id: 'a' is already the id of devices\[0\]",
        ),
        (
            _replace("bandwidth_mbps: 100", "bandwidth_mbps: -5"),
            r"network\.bandwidth_mbps: must be > 0, got -5",
        ),
        (
            _replace("bandwidth_mbps: 100", "bandwidth_mbps: 0"),
            r"network\.bandwidth_mbps: must be > 0",
        ),
        (
            _replace(
                "network: {kind: shared, bandwidth_mbps: 100, latency_ms: 3}",
                "network: {kind: links, links: [{a: a, b: c, bandwidth_mbps: 50}]}",
            ),
            r"network\.links\[0\]\.b: unknown device 'c'",
        ),
        (
            _replace(
                "network: {kind: shared, bandwidth_mbps: 100, latency_ms: 3}",
                "network: {kind: links, links: [{a: a, b: b, bandwidth_mbps: 5},"
                " {a: b, b: a, bandwidth_mbps: 5}]}",
            ),
            r"network\.links\[1\]: b-a is already network\.links\[0\]",
        ),
        (_replace("kind: shared", "kind: mesh"), r"network\.kind: must be one of shared, links"),
        (
            _replace("activation_mb: 0.25", "activation_mb: -0.25"),
            r"model\.layers\[1\]\.activation_mb: must be >= 0",
        ),
        (
            _replace("gflops_bwd: 0.75", "gflops_bwd: 0"),
            r"model\.layers\[1\]\.gflops_bwd: must be > 0",
        ),
        (_replace("batch: 1", "batch: 0"), r"workload\.batch: must be >= 1, got 0"),
        (_replace("batch: 1", "batch: 1.5"), r"workload\.batch: must be an integer"),
        (
            _replace("kind: inference", "kind: serving"),
            r"workload\.kind: must be one of inference, training",
        ),
        (
            _replace("objective: min_energy", "objective: min_cost"),
            r"qoe\.objective: must be one of",
        ),
        (_replace("latency_ms: 800", "latency_ms: 0"), r"qoe\.latency_ms: must be > 0"),
        (
            _replace("{at_s: 30, device: a,", "{at_s: 30, device: z,"),
            r"dynamics\[2\]\.device: unknown device 'z'",
        ),
        (
            _replace("{at_s: 10, bandwidth_mbps: 40}", "{at_s: -1, bandwidth_mbps: 40}"),
            r"dynamics\[1\]\.at_s: must be >= 0",
        ),
        (
            _replace("{at_s: 10, bandwidth_mbps: 40}", "{at_s: 10, bandwidth_mbps: 0}"),
            r"dynamics\[1\]\.bandwidth_mbps: must be > 0",
        ),
        (
            _replace("{at_s: 20, device: b, leave: true}", "{at_s: 20, device: b, leave: false}"),
            r"dynamics\[0\]\.leave: must be true",
        ),
        (
            _replace("{at_s: 20, device: b, leave: true}", "{at_s: 50, device: b, leave: true}"),
            r"dynamics\[3\]\.device: 'b' joins at 40 s but is in the fleet",
        ),
        (
            _replace("slowdown: 2.0}", "slowdown: 2.0, join: true}"),
            r"dynamics\[2\]: needs exactly one of",
        ),
        (
            _replace("{at_s: 10, bandwidth_mbps: 40}", "{at_s: 10, slowdown: 2}"),
            r"dynamics\[1\]\.device: required with slowdown",
        ),
        (VALID + "name: again\n", "appears twice"),
        ("name: [unclosed", "not valid YAML"),
        ("- just a list", "must be a mapping, got list"),
    ],
)
def test_malformed_document_names_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        load_scenario(text)


def test_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(VALID.replace("class: raspberry-pi-4", "class: toaster"))
    with pytest.raises(InvalidArgument) as info:
        load_scenario(path)
    assert info.value.message.startswith(
        f"{path}: devices[0].class: unknown device class 'toaster'"
    )


def test_unknown_zoo_model_and_missing_file(tmp_path: Path) -> None:
    text = (
        VALID.split("model:")[0]
        + "model: {zoo: gpt5}\n"
        + "workload: {kind: inference, batch: 1}\n"
        + "qoe: {objective: min_latency}\n"
    )
    with pytest.raises(InvalidArgument, match=r"model\.zoo: unknown model 'gpt5'"):
        load_scenario(text)
    with pytest.raises(NotFound):
        load_scenario(tmp_path / "nope.yaml")
    with pytest.raises(NotFound):
        load_scenario(str(tmp_path / "nope.yaml"))
    with pytest.raises(NotFound):
        load_scenarios(tmp_path)  # a folder with no scenario files


def test_load_scenarios_refuses_duplicate_names(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text(VALID)
    (tmp_path / "two.yml").write_text(VALID)
    with pytest.raises(InvalidArgument, match="is also the name of"):
        load_scenarios(tmp_path)
    (tmp_path / "two.yml").write_text(VALID.replace("name: tiny", "name: abc"))
    assert [s.name for s in load_scenarios(tmp_path)] == ["abc", "tiny"]
    assert [s.name for s in load_scenarios(tmp_path / "one.yaml")] == ["tiny"]


# ---------------------------------------------------------------------------------------------
# Back to documents


def test_explicit_table_round_trip() -> None:
    for source in (VALID, SUITE / "orchard-audio-custom.yaml"):
        scenario = load_scenario(source)
        doc = scenario_to_dict(scenario)
        again = load_scenario(yaml.safe_dump(json.loads(json.dumps(doc))))
        assert again == scenario


def test_zoo_scenario_round_trip() -> None:
    scenario = load_scenario(SUITE / "smart-home-assistant-dynamics.yaml")
    doc = scenario_to_dict(scenario)
    assert doc["model"] == {"zoo": "gpt2-medium"}
    assert doc["devices"][0]["class"] == "pixel-8"
    assert load_scenario(yaml.safe_dump(doc)) == scenario


# ---------------------------------------------------------------------------------------------
# doramesh plan


def test_run_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    with structlog.testing.capture_logs():
        code = run_plan(str(SUITE / "doorbell-resnet18.yaml"), "doramesh", True)
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert report["scenario"] == "doorbell-resnet18"
    assert report["planner"] == "doramesh"
    assert report["plan_seconds"] >= 0
    plans = report["plan_set"]["plans"]
    assert plans and set(report["plan_set"]["mix"]) == {p["plan_id"] for p in plans}
    assert all(report["qoe_met"].values())
    assert plans[0]["predicted"]["latency_ms"] <= 120


def test_run_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    with structlog.testing.capture_logs():
        code = run_plan(str(SUITE / "orchard-audio-custom.yaml"), "doramesh", False, max_plans=1)
    out = capsys.readouterr().out
    assert code == 0
    assert "orchard-audio-custom" in out and "zero-1" in out and "met" in out


def test_run_plan_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    impossible = tmp_path / "impossible.yaml"
    impossible.write_text(VALID.replace("latency_ms: 800", "latency_ms: 1"))
    with structlog.testing.capture_logs():
        assert run_plan(str(impossible), "doramesh", True) == 2
    err = capsys.readouterr().err
    assert "no plan meets the QoE" in err and "latency_ms 1 cannot be met" in err
    assert run_plan(str(tmp_path / "missing.yaml"), "doramesh", False) == 2
    assert "no such scenario file" in capsys.readouterr().err
    assert run_plan(str(impossible), "no-such-planner", False) == 2
    assert "unknown planner" in capsys.readouterr().err


def test_failed_precondition_is_what_plan_raises() -> None:
    """run_plan's exit path for infeasible QoE relies on this error type."""
    s = load_scenario(textwrap.dedent(VALID).replace("latency_ms: 800", "latency_ms: 1"))
    with pytest.raises(FailedPrecondition):
        _quiet_plan(s)


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(VALID + "#" * (4 << 20))
    with pytest.raises(InvalidArgument, match="not a scenario file"):
        load_scenario(path)


def test_plan_subcommand_parses() -> None:
    import argparse

    from doramesh.plan_cli import add_plan_parser

    parser = argparse.ArgumentParser(prog="doramesh")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", "x.yaml", "--planner", "uniform", "--json"])
    assert (args.command, args.scenario, args.planner, args.json) == (
        "plan",
        "x.yaml",
        "uniform",
        True,
    )
    assert args.max_plans == api.DEFAULT_MAX_PLANS
