"""Scenario files (YAML) to ``Scenario`` values, and back to plain dicts for JSON records.

The format is DESIGN.md's ("A scenario file"); ``scenarios/README.md`` lists the shipped suite.
The planner bench, ``doramesh plan`` and the testbed all read scenarios through this module, so
a file means the same thing to each of them.

Validation is strict because a scenario is an experiment's input: a misspelt key that silently
fell back to a default would produce plausible-looking but wrong figures. Every error is an
``InvalidArgument`` that names the file and the field path (``devices[2].gflops: must be > 0,
got -1``). Rules that are not obvious from the format:

* A device gives a catalogue ``class``, explicit figures, or both; an explicit figure wins over
  the class's. Without a class, ``gflops``, ``memory_mb``, ``power_idle_w`` and
  ``power_active_w`` are required (energy planning is meaningless without power figures);
  ``power_tx_w`` defaults to 0, ``battery_wh`` to null (mains), ``cores`` to 1. A class gives its
  *usable* memory, what doramesh may take on that device. ``memory_mb`` is MiB (``2**20`` bytes).
* ``network: {kind: links}`` need not list every pair: a pair without a link has no direct path
  (``Network.link`` gives bandwidth 0), and the planner never places consecutive pipeline stages
  on such a pair. A pair may be listed once only.
* A layer table given explicitly is per sample, forward pass; sizes are MiB. ``gflops_bwd``
  defaults to twice ``gflops`` (DESIGN.md); when given it must be positive.
* Dynamics events may come in any order; they are stored sorted by ``at_s`` (stable). Every
  listed device is present at the start, so a device may ``leave`` only while present and
  ``join`` only after it left. ``bandwidth_mbps`` sets the shared medium's rate, or every link's.
* ``model: {zoo: NAME}`` takes only zoo (or already registered) model names, never an import
  path: reading a scenario file must not import code named in it. The zoo needs torch, imported
  only then, so a file with an explicit table loads without torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import yaml

from doramesh.agent.catalogue import CATALOGUE, DeviceClass
from doramesh.errors import FailedPrecondition, InvalidArgument, NotFound
from doramesh.scenario_types import DynamicsEvent, Scenario
from doramesh.types import (
    MIB,
    DeviceProfile,
    LayerInfo,
    LayerTable,
    Link,
    Network,
    NodeId,
    Objective,
    QoESpec,
    Workload,
    WorkloadKind,
)

#: File suffixes ``load_scenarios`` picks up in a folder.
SCENARIO_SUFFIXES = (".yaml", ".yml")
#: Largest scenario document accepted. A hand-written scenario is a few kB even with an explicit
#: table of hundreds of layers; anything near this is a wrong file, not a scenario.
MAX_SCENARIO_BYTES = 4 * MIB
#: ``device_class`` of a device given by explicit figures only.
CUSTOM_CLASS = "custom"

_OBJECTIVES: tuple[Objective, ...] = ("min_energy", "min_latency", "max_throughput")
_WORKLOAD_KINDS: tuple[WorkloadKind, ...] = ("inference", "training")
_TOP_REQUIRED = ("name", "devices", "network", "model", "workload", "qoe")
_TOP_OPTIONAL = ("description", "dynamics")
_DEVICE_FIGURES = (
    "gflops",
    "memory_mb",
    "power_idle_w",
    "power_active_w",
    "power_tx_w",
    "battery_wh",
    "cores",
)
_POWER_FIELDS = ("power_idle_w", "power_active_w", "power_tx_w")
_LAYER_REQUIRED = ("name", "gflops", "param_mb", "activation_mb")
_LAYER_OPTIONAL = ("workspace_mb", "gflops_bwd")
_EVENT_KINDS = ("bandwidth_mbps", "leave", "join", "slowdown")

_Choice = TypeVar("_Choice", bound=str)


# ---------------------------------------------------------------------------------------------
# Public API


def load_scenario(path_or_text: str | os.PathLike[str]) -> Scenario:
    """One scenario from a file path or from YAML text.

    A ``PathLike``, or a one-line string naming an existing file or ending in ``.yaml``/``.yml``,
    is read as a file (``NotFound`` if it does not exist); any other string is the document.
    """
    source, text = _read_source(path_or_text)
    return _Parser(source).scenario(_parse_yaml(source, text))


def load_scenarios(dir_or_file: str | os.PathLike[str]) -> list[Scenario]:
    """Every scenario in a folder (its ``*.yaml``/``*.yml`` files, not recursive), or one file,
    sorted by name. Two files with the same ``name`` are refused: records are keyed by it."""
    path = Path(dir_or_file)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SCENARIO_SUFFIXES and p.is_file())
        if not files:
            raise NotFound(f"{path}: no scenario files (*.yaml, *.yml) in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise NotFound(f"{path}: no such scenario file or folder")
    scenarios: dict[str, tuple[Path, Scenario]] = {}
    for file in files:
        scenario = load_scenario(file)
        if scenario.name in scenarios:
            other = scenarios[scenario.name][0]
            raise InvalidArgument(f"{file}: name: {scenario.name!r} is also the name of {other}")
        scenarios[scenario.name] = (file, scenario)
    return [scenarios[name][1] for name in sorted(scenarios)]


def scenario_to_dict(s: Scenario) -> dict[str, Any]:
    """The scenario as a plain, JSON-ready document in the scenario file format.

    Devices carry every figure (and their class, when they have one), so a record is readable
    without the catalogue; ``load_scenario`` of the dumped document gives back an equal
    ``Scenario`` (a zoo model is named, not tabulated, and so needs torch to reload).
    """
    doc: dict[str, Any] = {"name": s.name}
    if s.description:
        doc["description"] = s.description
    doc["devices"] = [_device_to_dict(d) for d in s.devices]
    doc["network"] = _network_to_dict(s.network)
    doc["model"] = _model_to_dict(s)
    doc["workload"] = {
        "kind": s.workload.kind,
        "batch": s.workload.batch,
        "rate_rps": s.workload.rate_rps,
    }
    doc["qoe"] = {
        "objective": s.qoe.objective,
        "latency_ms": s.qoe.latency_ms,
        "min_throughput_sps": s.qoe.min_throughput_sps,
        "energy_j_per_sample": s.qoe.energy_j_per_sample,
    }
    if s.dynamics:
        doc["dynamics"] = [_event_to_dict(e) for e in s.dynamics]
    return doc


# ---------------------------------------------------------------------------------------------
# Reading the document


def _read_source(path_or_text: str | os.PathLike[str]) -> tuple[str, str]:
    """(name used in error messages, YAML text)."""
    if isinstance(path_or_text, str) and (
        "\n" in path_or_text
        or not (path_or_text.endswith(SCENARIO_SUFFIXES) or _is_file(path_or_text))
    ):
        if len(path_or_text) > MAX_SCENARIO_BYTES:
            raise InvalidArgument(f"scenario text is over {MAX_SCENARIO_BYTES} bytes")
        return "<scenario text>", path_or_text
    path = Path(path_or_text)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SCENARIO_BYTES + 1)
        if len(data) > MAX_SCENARIO_BYTES:
            raise InvalidArgument(f"{path}: over {MAX_SCENARIO_BYTES} bytes: not a scenario file")
        return str(path), data.decode("utf-8")
    except FileNotFoundError:
        raise NotFound(f"{path}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"{path}: cannot read: {err}") from None


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # a long or NUL-containing document is no path
        return False


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one,
    which would hide an edit mistake the same way a misspelt key would)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (line {mark.line + 1})", mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(source: str, text: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise InvalidArgument(f"{source}: not valid YAML: {err}") from None


# ---------------------------------------------------------------------------------------------
# Validation: one method per section, each naming its field path in errors


@dataclass(frozen=True, slots=True)
class _Parser:
    source: str

    def fail(self, path: str, message: str) -> NoReturn:
        raise InvalidArgument(f"{self.source}: {path or '(document)'}: {message}")

    # -- shapes -------------------------------------------------------------------------------

    def mapping(
        self,
        value: object,
        path: str,
        required: Sequence[str],
        optional: Sequence[str] = (),
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, got {_kind(value)}")
        allowed = (*required, *optional)
        for key in value:
            if key not in allowed:
                self.fail(
                    _join(path, str(key)),
                    f"unknown key (allowed here: {', '.join(allowed)})",
                )
        for key in required:
            if key not in value:
                self.fail(_join(path, key), "required")
        return cast(dict[str, Any], value)

    def sequence(self, value: object, path: str, *, non_empty: bool = True) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, f"must be a list, got {_kind(value)}")
        if non_empty and not value:
            self.fail(path, "must not be empty")
        return value

    def string(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"must be a non-empty string, got {value!r}")
        return value

    def number(
        self,
        value: object,
        path: str,
        *,
        positive: bool = False,
    ) -> float:
        """A finite number, >= 0 (or > 0 with ``positive``): no figure in a scenario is
        meaningfully negative."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"must be a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            self.fail(path, f"must be finite, got {value!r}")
        if positive and number <= 0:
            self.fail(path, f"must be > 0, got {value!r}")
        if number < 0:
            self.fail(path, f"must be >= 0, got {value!r}")
        return number

    def optional_number(self, value: object, path: str, *, positive: bool = False) -> float | None:
        return None if value is None else self.number(value, path, positive=positive)

    def integer(self, value: object, path: str, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, got {value!r}")
        if value < minimum:
            self.fail(path, f"must be >= {minimum}, got {value!r}")
        return value

    def choice(self, value: object, path: str, choices: Sequence[_Choice]) -> _Choice:
        for choice in choices:
            if value == choice:
                return choice
        self.fail(path, f"must be one of {', '.join(choices)}, got {value!r}")

    # -- sections -----------------------------------------------------------------------------

    def scenario(self, doc: object) -> Scenario:
        top = self.mapping(doc, "", _TOP_REQUIRED, _TOP_OPTIONAL)
        name = self.string(top["name"], "name")
        description = top.get("description")
        if description is None:
            description = ""
        elif not isinstance(description, str):
            self.fail("description", f"must be a string, got {_kind(description)}")
        devices = self.devices(top["devices"])
        ids = [d.node_id for d in devices]
        network = self.network(top["network"], ids)
        model, zoo_model, sample_shape = self.model(top["model"], name)
        workload = self.workload(top["workload"])
        qoe = self.qoe(top["qoe"])
        dynamics = self.dynamics(top.get("dynamics"), ids)
        return Scenario(
            name=name,
            devices=devices,
            network=network,
            model=model,
            zoo_model=zoo_model,
            workload=workload,
            qoe=qoe,
            dynamics=dynamics,
            description=description.strip(),
            zoo_sample_shape=sample_shape,
        )

    def devices(self, value: object) -> tuple[DeviceProfile, ...]:
        items = self.sequence(value, "devices")
        devices: list[DeviceProfile] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(items):
            path = f"devices[{index}]"
            device = self.device(item, path)
            if device.node_id in seen:
                self.fail(
                    f"{path}.id",
                    f"{device.node_id!r} is already the id of devices[{seen[device.node_id]}]",
                )
            seen[device.node_id] = index
            devices.append(device)
        return tuple(devices)

    def device(self, value: object, path: str) -> DeviceProfile:
        raw = self.mapping(value, path, ("id",), ("class", *_DEVICE_FIGURES))
        node_id = self.string(raw["id"], f"{path}.id")
        base: DeviceClass | None = None
        if "class" in raw:
            class_name = self.string(raw["class"], f"{path}.class")
            base = CATALOGUE.get(class_name)
            if base is None:
                self.fail(
                    f"{path}.class",
                    f"unknown device class {class_name!r} (known: {', '.join(sorted(CATALOGUE))})",
                )
        else:
            for key in ("gflops", "memory_mb", "power_idle_w", "power_active_w"):
                if key not in raw:
                    self.fail(f"{path}.{key}", "required for a device without a class")

        def figure(key: str, default: float, *, positive: bool = False) -> float:
            if key not in raw:
                return default
            return self.number(raw[key], f"{path}.{key}", positive=positive)

        gflops = figure("gflops", base.gflops if base else 0.0, positive=True)
        if "memory_mb" in raw:
            memory_bytes = round(
                self.number(raw["memory_mb"], f"{path}.memory_mb", positive=True) * MIB
            )
        else:
            assert base is not None  # a device without a class was required to give memory_mb
            memory_bytes = base.usable_memory_bytes
        idle = figure("power_idle_w", base.power_idle_w if base else 0.0)
        active = figure("power_active_w", base.power_active_w if base else 0.0)
        tx = figure("power_tx_w", base.power_tx_w if base else 0.0)
        if active < idle:
            self.fail(
                f"{path}.power_active_w",
                f"must be >= power_idle_w ({idle:g}), got {active:g}",
            )
        if "battery_wh" in raw:
            battery = self.optional_number(raw["battery_wh"], f"{path}.battery_wh", positive=True)
        else:
            battery = base.battery_wh if base else None
        cores = (
            self.integer(raw["cores"], f"{path}.cores", minimum=1)
            if "cores" in raw
            else (base.cores if base else 1)
        )
        # "catalogue" only when every power figure is the class's: the bench reports whether
        # energy figures came from datasheets or from the scenario's author.
        from_catalogue = base is not None and (idle, active, tx) == (
            base.power_idle_w,
            base.power_active_w,
            base.power_tx_w,
        )
        return DeviceProfile(
            node_id=NodeId(node_id),
            device_class=base.name if base else CUSTOM_CLASS,
            gflops=gflops,
            memory_bytes=memory_bytes,
            cores=cores,
            power_idle_w=idle,
            power_active_w=active,
            power_tx_w=tx,
            battery_wh=battery or 0.0,  # DeviceProfile's convention: 0 = mains powered
            power_source="catalogue" if from_catalogue else "scenario",
            # The class's power modes are its figures at lower clocks: they hold only for a
            # device that keeps the class's speed and active power.
            power_modes=(
                base.power_modes
                if base is not None and (gflops, active) == (base.gflops, base.power_active_w)
                else ()
            ),
        )

    def network(self, value: object, ids: Sequence[NodeId]) -> Network:
        kind = self.choice(
            self.mapping(value, "network", ("kind",), ("bandwidth_mbps", "latency_ms", "links"))[
                "kind"
            ],
            "network.kind",
            ("shared", "links"),
        )
        if kind == "shared":
            raw = self.mapping(value, "network", ("kind", "bandwidth_mbps"), ("latency_ms",))
            return Network(
                kind="shared",
                bandwidth_mbps=self.number(
                    raw["bandwidth_mbps"], "network.bandwidth_mbps", positive=True
                ),
                latency_ms=self.number(raw.get("latency_ms", 0.0), "network.latency_ms"),
            )
        raw = self.mapping(value, "network", ("kind", "links"))
        known = set(ids)
        links: list[Link] = []
        pairs: dict[frozenset[str], int] = {}
        for index, item in enumerate(self.sequence(raw["links"], "network.links")):
            path = f"network.links[{index}]"
            link = self.mapping(item, path, ("a", "b", "bandwidth_mbps"), ("latency_ms",))
            ends = []
            for end in ("a", "b"):
                node = self.string(link[end], f"{path}.{end}")
                if node not in known:
                    self.fail(f"{path}.{end}", f"unknown device {node!r}")
                ends.append(NodeId(node))
            if ends[0] == ends[1]:
                self.fail(f"{path}.b", f"a link joins two different devices, got {ends[1]!r} twice")
            pair = frozenset(ends)
            if pair in pairs:
                self.fail(path, f"{ends[0]}-{ends[1]} is already network.links[{pairs[pair]}]")
            pairs[pair] = index
            links.append(
                Link(
                    a=ends[0],
                    b=ends[1],
                    bandwidth_mbps=self.number(
                        link["bandwidth_mbps"], f"{path}.bandwidth_mbps", positive=True
                    ),
                    latency_ms=self.number(link.get("latency_ms", 0.0), f"{path}.latency_ms"),
                )
            )
        return Network(kind="links", links=tuple(links))

    def model(
        self, value: object, scenario_name: str
    ) -> tuple[LayerTable, str | None, tuple[int, ...] | None]:
        """(layer table, zoo name or None, sample shape given for the zoo model or None)."""
        if isinstance(value, dict) and "zoo" in value:
            raw = self.mapping(value, "model", ("zoo",), ("sample_shape",))
            return self.zoo_model(raw)
        raw = self.mapping(value, "model", ("layers",), ("name", "input_mb"))
        name = self.string(raw["name"], "model.name") if "name" in raw else scenario_name
        input_bytes = round(self.number(raw.get("input_mb", 0.0), "model.input_mb") * MIB)
        layers = []
        for index, item in enumerate(self.sequence(raw["layers"], "model.layers")):
            path = f"model.layers[{index}]"
            layer = self.mapping(item, path, _LAYER_REQUIRED, _LAYER_OPTIONAL)
            layers.append(
                LayerInfo(
                    name=self.string(layer["name"], f"{path}.name"),
                    gflops=self.number(layer["gflops"], f"{path}.gflops"),
                    param_bytes=round(self.number(layer["param_mb"], f"{path}.param_mb") * MIB),
                    activation_bytes=round(
                        self.number(layer["activation_mb"], f"{path}.activation_mb") * MIB
                    ),
                    workspace_bytes=round(
                        self.number(layer.get("workspace_mb", 0.0), f"{path}.workspace_mb") * MIB
                    ),
                    # 0 is LayerInfo's "twice the forward"; an explicit value must be real.
                    gflops_bwd=self.number(layer["gflops_bwd"], f"{path}.gflops_bwd", positive=True)
                    if "gflops_bwd" in layer
                    else 0.0,
                )
            )
        return LayerTable(model=name, layers=tuple(layers), input_bytes=input_bytes), None, None

    def zoo_model(
        self, raw: dict[str, Any]
    ) -> tuple[LayerTable, str | None, tuple[int, ...] | None]:
        name = self.string(raw["zoo"], "model.zoo")
        shape: tuple[int, ...] | None = None
        if raw.get("sample_shape") is not None:
            items = self.sequence(raw["sample_shape"], "model.sample_shape")
            shape = tuple(
                self.integer(v, f"model.sample_shape[{i}]", minimum=1) for i, v in enumerate(items)
            )
        try:
            # Lazy: torch is needed only for zoo models (meta-device profiling).
            from doramesh import models
        except ImportError as err:
            raise FailedPrecondition(
                f"{self.source}: model.zoo: profiling zoo model {name!r} needs torch "
                f"(pip install 'doramesh[agent]'), or give an explicit layer table: {err}"
            ) from None
        known = models.names()
        if name not in known:
            self.fail("model.zoo", f"unknown model {name!r} (known: {', '.join(known)})")
        try:
            table = models.layer_table(name, shape)
        except InvalidArgument as err:
            self.fail("model.sample_shape" if shape else "model.zoo", err.message)
        return table, name, shape

    def workload(self, value: object) -> Workload:
        raw = self.mapping(value, "workload", ("kind", "batch"), ("rate_rps",))
        rate = raw.get("rate_rps")
        return Workload(
            kind=self.choice(raw["kind"], "workload.kind", _WORKLOAD_KINDS),
            batch=self.integer(raw["batch"], "workload.batch", minimum=1),
            # null or absent: no fixed request rate, as many as the plan can serve
            rate_rps=0.0 if rate is None else self.number(rate, "workload.rate_rps"),
        )

    def qoe(self, value: object) -> QoESpec:
        bounds = ("latency_ms", "min_throughput_sps", "energy_j_per_sample")
        raw = self.mapping(value, "qoe", ("objective",), bounds)
        latency, throughput, energy = (
            self.optional_number(raw.get(key), f"qoe.{key}", positive=True) for key in bounds
        )
        return QoESpec(
            objective=self.choice(raw["objective"], "qoe.objective", _OBJECTIVES),
            latency_ms=latency,
            min_throughput_sps=throughput,
            energy_j_per_sample=energy,
        )

    def dynamics(self, value: object, ids: Sequence[NodeId]) -> tuple[DynamicsEvent, ...]:
        if value is None:
            return ()
        items = self.sequence(value, "dynamics", non_empty=False)
        events = [self.event(item, f"dynamics[{i}]", ids) for i, item in enumerate(items)]
        order = sorted(range(len(events)), key=lambda i: events[i].at_s)
        present = set(ids)
        for i in order:
            event, path = events[i], f"dynamics[{i}]"
            if event.device is None:
                continue
            if event.leave:
                if event.device not in present:
                    self.fail(
                        f"{path}.device",
                        f"{event.device!r} leaves at {event.at_s:g} s but has already left",
                    )
                present.discard(event.device)
            elif event.join:
                if event.device in present:
                    self.fail(
                        f"{path}.device",
                        f"{event.device!r} joins at {event.at_s:g} s but is in the fleet then "
                        "(every listed device starts present; join only after a leave)",
                    )
                present.add(event.device)
        return tuple(events[i] for i in order)

    def event(self, value: object, path: str, ids: Sequence[NodeId]) -> DynamicsEvent:
        raw = self.mapping(value, path, ("at_s",), ("device", *_EVENT_KINDS))
        at_s = self.number(raw["at_s"], f"{path}.at_s")
        kinds = [k for k in _EVENT_KINDS if k in raw]
        if len(kinds) != 1:
            self.fail(
                path,
                f"needs exactly one of {', '.join(_EVENT_KINDS)}, got "
                f"{', '.join(kinds) if kinds else 'none'}",
            )
        kind = kinds[0]
        if kind == "bandwidth_mbps":
            if "device" in raw:
                self.fail(f"{path}.device", "a bandwidth change applies to the whole network")
            return DynamicsEvent(
                at_s=at_s,
                bandwidth_mbps=self.number(
                    raw["bandwidth_mbps"], f"{path}.bandwidth_mbps", positive=True
                ),
            )
        if "device" not in raw:
            self.fail(f"{path}.device", f"required with {kind}")
        device = self.string(raw["device"], f"{path}.device")
        if device not in ids:
            self.fail(f"{path}.device", f"unknown device {device!r}")
        node = NodeId(device)
        if kind == "slowdown":
            factor = self.number(raw["slowdown"], f"{path}.slowdown", positive=True)
            return DynamicsEvent(at_s=at_s, device=node, slowdown=factor)
        if raw[kind] is not True:
            self.fail(f"{path}.{kind}", f"must be true, got {raw[kind]!r}")
        return DynamicsEvent(at_s=at_s, device=node, leave=kind == "leave", join=kind == "join")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Back to documents


def _device_to_dict(d: DeviceProfile) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": d.node_id}
    if d.device_class != CUSTOM_CLASS:
        doc["class"] = d.device_class
    doc.update(
        gflops=d.gflops,
        memory_mb=d.memory_bytes / MIB,
        power_idle_w=d.power_idle_w,
        power_active_w=d.power_active_w,
        power_tx_w=d.power_tx_w,
        battery_wh=d.battery_wh or None,
        cores=d.cores,
    )
    return doc


def _network_to_dict(n: Network) -> dict[str, Any]:
    if n.kind == "shared":
        return {"kind": "shared", "bandwidth_mbps": n.bandwidth_mbps, "latency_ms": n.latency_ms}
    return {
        "kind": "links",
        "links": [
            {"a": k.a, "b": k.b, "bandwidth_mbps": k.bandwidth_mbps, "latency_ms": k.latency_ms}
            for k in n.links
        ],
    }


def _model_to_dict(s: Scenario) -> dict[str, Any]:
    if s.zoo_model is not None:
        doc: dict[str, Any] = {"zoo": s.zoo_model}
        if s.zoo_sample_shape is not None:
            doc["sample_shape"] = list(s.zoo_sample_shape)
        return doc
    layers: list[dict[str, Any]] = []
    for layer in s.model.layers:
        item: dict[str, Any] = {
            "name": layer.name,
            "gflops": layer.gflops,
            "param_mb": layer.param_bytes / MIB,
            "activation_mb": layer.activation_bytes / MIB,
            "workspace_mb": layer.workspace_bytes / MIB,
        }
        if layer.gflops_bwd > 0:
            item["gflops_bwd"] = layer.gflops_bwd
        layers.append(item)
    return {"name": s.model.model, "input_mb": s.model.input_bytes / MIB, "layers": layers}


def _event_to_dict(e: DynamicsEvent) -> dict[str, Any]:
    doc: dict[str, Any] = {"at_s": e.at_s}
    if e.bandwidth_mbps is not None:
        doc["bandwidth_mbps"] = e.bandwidth_mbps
        return doc
    doc["device"] = e.device
    if e.leave:
        doc["leave"] = True
    elif e.join:
        doc["join"] = True
    else:
        doc["slowdown"] = e.slowdown
    return doc


def scenario_summary(s: Scenario) -> Mapping[str, str]:
    """Short human descriptions of a scenario's parts, for tables (``doramesh plan``, bench)."""
    objective = s.qoe.objective
    bounds = []
    if s.qoe.latency_ms is not None:
        bounds.append(f"latency <= {s.qoe.latency_ms:g} ms")
    if s.qoe.min_throughput_sps is not None:
        bounds.append(f">= {s.qoe.min_throughput_sps:g} samples/s")
    if s.qoe.energy_j_per_sample is not None:
        bounds.append(f"<= {s.qoe.energy_j_per_sample:g} J/sample")
    if s.network.kind == "shared":
        network = f"shared {s.network.bandwidth_mbps:g} Mbit/s, {s.network.latency_ms:g} ms"
    else:
        network = f"{len(s.network.links)} links"
    w = s.workload
    rate = f" at {w.rate_rps:g} req/s" if w.rate_rps else ""
    return {
        "devices": ", ".join(f"{d.node_id} ({d.device_class})" for d in s.devices),
        "network": network,
        "model": s.zoo_model or f"{s.model.model} ({len(s.model)} layers)",
        "workload": f"{w.kind}, batch {w.batch}{rate}",
        "objective": objective,
        "bounds": "; ".join(bounds) or "none",
    }
