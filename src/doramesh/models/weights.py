"""A stage's weights as content-addressed safetensors bytes, and loading them back.

The coordinator builds only a stage's blocks, serialises them, and ships the bytes with their
sha256; the agent rebuilds the architecture on the meta device (no random-init cost, no second
copy in memory) and assigns the received tensors, checking every key, shape and dtype.
Nothing is unpickled: safetensors is a JSON header plus raw little-endian tensor data.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from doramesh.errors import InvalidArgument
from doramesh.models import zoo

FORMAT = "doramesh-stage/1"
METADATA_KEY = "doramesh.stage"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def stage_weights(name: str, seed: int, first: int, last: int) -> tuple[bytes, str]:
    """The safetensors bytes of blocks ``first..last`` (params and buffers) and their sha256.

    Keys carry global block indices (``"3.conv1.weight"``); the header's metadata records the
    model and range so ``load_stage`` can refuse bytes meant for another stage. The bytes are
    deterministic, so the digest is a stable content address for (model, seed, range).
    """
    model = zoo.build_blocks(name, seed, first, last)
    # Contiguous, unshared copies: safetensors refuses aliased or strided tensors.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    # One metadata key holding canonical JSON: safetensors writes a multi-key metadata map in
    # hash order, which would make the bytes (and the digest) differ from run to run.
    stage = {"format": FORMAT, "model": name, "first": first, "last": last}
    data = st_save(tensors, metadata={METADATA_KEY: json.dumps(stage, sort_keys=True)})
    return data, hashlib.sha256(data).hexdigest()


def _stage_metadata(weights: bytes) -> dict[str, object]:
    """The stage description ``stage_weights`` put in a safetensors header ({} if none)."""
    if len(weights) < 8:
        raise InvalidArgument("stage weights: too short to be safetensors")
    (size,) = struct.unpack("<Q", weights[:8])
    if size > min(MAX_HEADER_BYTES, len(weights) - 8):
        raise InvalidArgument("stage weights: bad safetensors header size")
    try:
        header = json.loads(weights[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"stage weights: bad safetensors header: {e}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    raw = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    if not isinstance(raw, str):
        return {}
    try:
        stage = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"stage weights: bad {METADATA_KEY} metadata: {e}") from e
    return stage if isinstance(stage, dict) else {}


def load_stage(
    name: str,
    first: int,
    last: int,
    weights: bytes,
    *,
    device: str | torch.device = "cpu",
) -> nn.Sequential:
    """Blocks ``first..last`` of ``name`` holding ``weights``, in eval mode on ``device``.

    Raises InvalidArgument when the bytes are not safetensors, were made for another model or
    range, or do not match the architecture exactly (missing, unexpected, reshaped or retyped
    tensors).
    """
    meta = _stage_metadata(weights)
    want: dict[str, object] = {"model": name, "first": first, "last": last}
    got = {k: meta.get(k) for k in want}
    if meta and got != want:
        raise InvalidArgument(f"stage weights are for {got}, not {want}")
    try:
        tensors = st_load(weights)
    except SafetensorError as e:
        raise InvalidArgument(f"stage weights: not valid safetensors: {e}") from e

    model = zoo.skeleton_blocks(name, first, last)
    expected = model.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise InvalidArgument(
            f"{name}[{first}..{last}] weights: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, ref in expected.items():
        t = tensors[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise InvalidArgument(
                f"{name}[{first}..{last}] weights: {key} is {t.dtype}{list(t.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
    model.load_state_dict(tensors, strict=True, assign=True)
    leftover = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise InvalidArgument(f"{name}[{first}..{last}]: tensors not in the weights: {leftover}")
    return model.to(device).eval()
