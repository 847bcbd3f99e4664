"""The registry of models and the API to build them, whole or one stage at a time.

A name is either a zoo name (``names()``), one registered with ``register``, or an import path
``"package.module:attribute"`` naming a ``ModelFactory`` (or a zero-argument callable returning
one). An import path imports code: accept one only from trusted configuration, never from a
remote request without an allow-list.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from doramesh.errors import InvalidArgument, NotFound
from doramesh.models.gpt2 import gpt2_medium, gpt2_small
from doramesh.models.llama import llama_1b
from doramesh.models.mlp import mlp_tiny
from doramesh.models.resnet import resnet18, resnet50
from doramesh.models.spec import ModelFactory, ModelSpec
from doramesh.models.vit import vit_base

_ZOO: dict[str, Callable[[], ModelFactory]] = {
    "mlp-tiny": mlp_tiny,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vit-base": vit_base,
    "gpt2-small": gpt2_small,
    "gpt2-medium": gpt2_medium,
    "llama-1b": llama_1b,
}

_lock = threading.Lock()
_factories: dict[str, ModelFactory] = {}
# Called after every register() so caches keyed by name (the layer tables) never go stale.
_on_register: list[Callable[[], None]] = []


def names() -> list[str]:
    """Zoo and registered names (import-path names are not listed until first used)."""
    with _lock:
        return sorted({*_ZOO, *_factories} - {n for n in _factories if ":" in n})


def register(name: str, factory: ModelFactory) -> None:
    """Add or replace a model under ``name``; its spec is reported under that name.

    Names with ``":"`` are reserved for import paths.
    """
    if not name or ":" in name or not isinstance(factory, ModelFactory):
        raise InvalidArgument(
            f"register({name!r}): need a non-empty name without ':' and a ModelFactory"
        )
    with _lock:
        _factories[name] = _named(factory, name)
    _registry_changed()


def unregister(name: str) -> None:
    """Forget a registered model (a zoo name reverts to the zoo's own model)."""
    with _lock:
        _factories.pop(name, None)
    _registry_changed()


def _registry_changed() -> None:
    for hook in _on_register:
        hook()


def _named(factory: ModelFactory, name: str) -> ModelFactory:
    if factory.spec.name == name:
        return factory
    return dataclasses.replace(factory, spec=dataclasses.replace(factory.spec, name=name))


def _import_factory(path: str) -> ModelFactory:
    module_name, _, attr = path.partition(":")
    try:
        target: object = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise NotFound(f"model {path!r}: cannot import: {e}") from e
    if inspect.isfunction(target):
        target = target()
    if not isinstance(target, ModelFactory):
        raise InvalidArgument(f"model {path!r}: {type(target).__name__} is not a ModelFactory")
    return target


def resolve(name: str) -> ModelFactory:
    """The factory for ``name``; raises NotFound for an unknown name."""
    with _lock:
        factory = _factories.get(name)
    if factory is not None:
        return factory
    if name in _ZOO:
        factory = _named(_ZOO[name](), name)
    elif ":" in name:
        factory = _named(_import_factory(name), name)
    else:
        raise NotFound(f"unknown model {name!r}; known: {', '.join(names())}")
    with _lock:
        return _factories.setdefault(name, factory)


def require_served(name: str) -> None:
    """Refuse a model name that came over the network unless it is in the zoo or was registered
    by this process (``register``, or ``--model-import`` at daemon start).

    An import path from a remote request would import arbitrary code on this device, so the
    network may only name models the operator already chose.
    """
    with _lock:
        known = name in _ZOO or name in _factories
    if not known:
        hint = (
            " (import paths are not accepted over the network: start the daemons with "
            "--model-import PATH)"
            if ":" in name
            else ""
        )
        raise NotFound(f"unknown model {name!r}{hint}; known: {', '.join(names())}")


def get_spec(name: str) -> ModelSpec:
    return resolve(name).spec


def block_range(spec: ModelSpec, first: int, last: int | None) -> tuple[int, int]:
    """Validate a block range (inclusive) and fill in ``last = num_blocks - 1`` when None."""
    end = spec.num_blocks - 1 if last is None else last
    for v in (first, end):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgument(f"block indices must be integers, got {v!r}")
    if not 0 <= first <= end < spec.num_blocks:
        raise InvalidArgument(
            f"{spec.name}: block range [{first}, {end}] is not within [0, {spec.num_blocks - 1}]"
        )
    return first, end


def sequential(blocks: list[nn.Module], first: int) -> nn.Sequential:
    """A Sequential whose child names are the GLOBAL block indices.

    So a stage's state_dict keys (``"7.attn.qkv.weight"``) say which blocks they belong to, and
    weights for one range cannot be loaded into another range of identical shape by mistake.
    """
    return nn.Sequential(OrderedDict((str(first + i), b) for i, b in enumerate(blocks)))


def _check_count(spec: ModelSpec, blocks: list[nn.Module], first: int, last: int) -> None:
    if len(blocks) != last - first + 1 or not all(isinstance(b, nn.Module) for b in blocks):
        raise InvalidArgument(
            f"{spec.name}: factory returned {len(blocks)} blocks for range [{first}, {last}]"
        )


def build_blocks(
    name: str,
    seed: int,
    first: int = 0,
    last: int | None = None,
    *,
    device: str | torch.device = "cpu",
) -> nn.Sequential:
    """Blocks ``first..last`` (inclusive) with their seeded weights, in eval mode on ``device``.

    Weights are generated on CPU whatever the device, so they are the same on every device.
    """
    factory = resolve(name)
    first, last = block_range(factory.spec, first, last)
    blocks = factory(seed, first, last)
    _check_count(factory.spec, blocks, first, last)
    return sequential(blocks, first).to(device).eval()


def skeleton_blocks(name: str, first: int = 0, last: int | None = None) -> nn.Sequential:
    """Blocks ``first..last`` on the meta device: shapes only, no memory, no init cost.

    Falls back to building (with seed 0) and moving to meta for a factory without a skeleton.
    """
    factory = resolve(name)
    first, last = block_range(factory.spec, first, last)
    if factory.skeleton is not None:
        with torch.device("meta"):
            blocks = factory.skeleton(first, last)
    else:
        blocks = factory(0, first, last)
    _check_count(factory.spec, blocks, first, last)
    return sequential(blocks, first).to("meta").eval()


def check_sample_shape(spec: ModelSpec, sample_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    shape = spec.sample_shape if sample_shape is None else tuple(sample_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise InvalidArgument(f"{spec.name}: bad sample shape {shape!r}")
    if len(shape) != len(spec.sample_shape):
        raise InvalidArgument(
            f"{spec.name}: sample shape {shape} must have {len(spec.sample_shape)} dims "
            f"like {spec.sample_shape}"
        )
    if spec.max_seq_len is not None and shape[-1] > spec.max_seq_len:
        raise InvalidArgument(f"{spec.name}: sequence length {shape[-1]} > {spec.max_seq_len}")
    return shape


def example_input(
    name: str, batch: int, seed: int = 0, sample_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """A deterministic CPU input batch: uniform token ids, or standard-normal features."""
    spec = get_spec(name)
    shape = check_sample_shape(spec, sample_shape)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise InvalidArgument(f"batch must be a positive integer, got {batch!r}")
    g = torch.Generator().manual_seed(seed)
    if spec.input_dtype in (torch.int64, torch.int32):
        if spec.vocab_size is None:
            raise InvalidArgument(f"{spec.name}: token input without a vocab_size")
        return torch.randint(0, spec.vocab_size, (batch, *shape), generator=g).to(spec.input_dtype)
    return torch.randn((batch, *shape), generator=g).to(spec.input_dtype)
