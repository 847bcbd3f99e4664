"""Per-block cost table of a model, measured on the meta device.

Every figure is per sample (batch 1) for one forward pass, measured by running the model's
skeleton on ``torch.device("meta")``: shapes propagate but nothing is allocated or computed, so
a 1B or 7B model profiles in about a second with no memory.

- ``gflops``: ``FlopCounterMode`` total / 1e9 (a multiply-add counts as 2 FLOPs).
- ``param_bytes``: parameters plus buffers of the block.
- ``activation_bytes``: the block's output, i.e. what goes over the wire to the next stage.
- ``workspace_bytes``: peak bytes of the tensors the block creates while running and holds at
  the same time, minus its output. Tracked op by op (a tensor counts from the op that creates
  its storage until its last reference dies; views are free). On meta, attention runs torch's
  math kernel, so this includes the ``heads * T * T`` score matrix that a fused kernel avoids:
  an upper bound for attention, exact for MLP hidden layers and convolutions.
- ``LayerTable.input_bytes``: the model input per sample.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from doramesh.errors import InvalidArgument
from doramesh.models import zoo
from doramesh.types import LayerInfo, LayerTable


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# TorchDispatchMode is untyped in torch; the ignores are for its __init_subclass__/__init__.
class _PeakLiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Tracks the peak of bytes held by storages created inside the mode."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.live = 0
        self.peak = 0
        # storage id -> [bytes, number of live tensors on it]
        self._storages: dict[int, list[int]] = {}

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in inputs and key not in self._storages:
                continue  # a view or in-place result on a tensor made outside: no new memory
            entry = self._storages.get(key)
            if entry is None:
                entry = self._storages[key] = [t.untyped_storage().nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


@functools.lru_cache(maxsize=64)
def _layer_table(name: str, sample_shape: tuple[int, ...]) -> LayerTable:
    spec = zoo.get_spec(name)
    model = zoo.skeleton_blocks(name)
    x = torch.empty((1, *sample_shape), dtype=spec.input_dtype, device="meta")
    input_bytes = _bytes(x)
    layers = []
    with torch.no_grad():
        for index, block in zip(range(spec.num_blocks), model, strict=True):
            try:
                with FlopCounterMode(display=False) as flops, _PeakLiveBytes() as memory:
                    y = block(x)
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise InvalidArgument(
                    f"{name}: block {index} fails on sample shape {sample_shape}: {e}"
                ) from e
            if not isinstance(y, torch.Tensor):
                raise InvalidArgument(f"{name}: block {index} must return one tensor")
            state = [*block.parameters(), *block.buffers()]
            layers.append(
                LayerInfo(
                    name=f"{index}.{type(block).__name__}",
                    gflops=flops.get_total_flops() / 1e9,
                    param_bytes=sum(_bytes(t) for t in state),
                    activation_bytes=_bytes(y),
                    workspace_bytes=max(0, memory.peak - _bytes(y)),
                )
            )
            x = y
    return LayerTable(model=name, layers=tuple(layers), input_bytes=input_bytes)


def layer_table(name: str, sample_shape: tuple[int, ...] | None = None) -> LayerTable:
    """The per-sample forward cost of every block of ``name`` (cached per name and shape)."""
    shape = zoo.check_sample_shape(zoo.get_spec(name), sample_shape)
    return _layer_table(name, shape)


zoo._on_register.append(_layer_table.cache_clear)
