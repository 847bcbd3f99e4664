"""The device catalogue: complete, consistent figures, and a typed error for unknown classes."""

from __future__ import annotations

import dataclasses

import pytest

from doramesh.agent.catalogue import CATALOGUE, DeviceClass, get_class
from doramesh.errors import NotFound, Status

REQUIRED = (
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-nano",
    "jetson-orin-nano",
    "pixel-8",
    "laptop-x86",
    "mini-pc",
)


def test_required_classes_are_present() -> None:
    assert set(REQUIRED) <= set(CATALOGUE)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_entry_figures_are_positive_and_consistent(name: str) -> None:
    device = CATALOGUE[name]
    assert device.name == name
    assert device.gflops > 0
    assert device.memory_bytes > 0
    assert 0 < device.usable_memory_bytes <= device.memory_bytes
    assert device.cores >= 1
    assert device.power_idle_w > 0
    assert device.power_active_w > device.power_idle_w
    assert device.power_tx_w > 0
    assert device.battery_wh is None or device.battery_wh > 0
    assert device.accelerator in (None, "cuda")


def test_memory_sizes_match_the_models_named() -> None:
    gib = 1 << 30
    assert get_class("raspberry-pi-4").memory_bytes == 4 * gib
    assert get_class("raspberry-pi-5").memory_bytes == 8 * gib
    assert get_class("jetson-nano").memory_bytes == 4 * gib
    assert get_class("jetson-orin-nano").memory_bytes == 8 * gib


def test_relative_speeds_are_plausible() -> None:
    # Orders the planner relies on: a Pi 5 beats a Pi 4, an Orin beats a Nano, a laptop beats a Pi.
    speed = {name: device.gflops for name, device in CATALOGUE.items()}
    assert speed["raspberry-pi-5"] > speed["raspberry-pi-4"]
    assert speed["jetson-orin-nano"] > speed["jetson-nano"]
    assert speed["laptop-x86"] > speed["raspberry-pi-5"]


def test_only_battery_devices_have_a_battery() -> None:
    assert get_class("pixel-8").battery_wh is not None
    assert get_class("laptop-x86").battery_wh is not None
    assert get_class("raspberry-pi-4").battery_wh is None


def test_get_class_returns_the_entry() -> None:
    assert get_class("pixel-8") is CATALOGUE["pixel-8"]


def test_unknown_class_is_not_found_and_lists_valid_names() -> None:
    with pytest.raises(NotFound) as info:
        get_class("raspberry-pi-9")
    assert info.value.status is Status.NOT_FOUND
    assert "raspberry-pi-9" in info.value.message
    for name in REQUIRED:
        assert name in info.value.message


def test_catalogue_and_entries_are_immutable() -> None:
    with pytest.raises(TypeError):
        CATALOGUE["fake"] = CATALOGUE["pixel-8"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        CATALOGUE["pixel-8"].gflops = 1e6  # type: ignore[misc]
    assert not hasattr(CATALOGUE["pixel-8"], "__dict__")  # slotted
    assert isinstance(CATALOGUE["pixel-8"], DeviceClass)
