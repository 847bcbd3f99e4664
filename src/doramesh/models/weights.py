"""A stage's weights as content-addressed safetensors bytes, and loading them back.

The coordinator builds only a stage's blocks, serialises them, and ships the bytes with their
sha256; the agent rebuilds the architecture on the meta device (no random-init cost, no second
copy in memory) and assigns the received tensors, checking every key, shape and dtype.
Nothing is unpickled: safetensors is a JSON header plus raw little-endian tensor data.

Memory on load is bounded by the stage itself, because a Raspberry Pi holding a 1 GiB stage has
no room for two: the coordinator writes a stage's file straight from the built module's tensors
(:func:`write_stage_weights`, no serialised copy in memory), and an agent loads from its cached
file (:func:`load_stage` given a path), whose tensors are a copy-on-write map of the file, so
they are paged in from the page cache rather than copied from a buffer.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file
from torch import nn

from doramesh.errors import InvalidArgument
from doramesh.models import zoo

FORMAT = "doramesh-stage/1"
METADATA_KEY = "doramesh.stage"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
#: Read size when hashing a weights file.
_HASH_CHUNK = 1 << 20


def _stage_tensors(name: str, seed: int, first: int, last: int) -> dict[str, torch.Tensor]:
    """A stage's tensors as safetensors takes them: contiguous and unaliased. Only a tensor
    that is strided, a view into a larger storage or sharing one with another is copied."""
    model = zoo.build_blocks(name, seed, first, last)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu")
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.nbytes
        if not whole or storage.data_ptr() in storages:
            t = t.contiguous().clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    return tensors


def _metadata(name: str, first: int, last: int) -> dict[str, str]:
    # One metadata key holding canonical JSON: safetensors writes a multi-key metadata map in
    # hash order, which would make the bytes (and the digest) differ from run to run.
    stage = {"format": FORMAT, "model": name, "first": first, "last": last}
    return {METADATA_KEY: json.dumps(stage, sort_keys=True)}


def stage_weights(name: str, seed: int, first: int, last: int) -> tuple[bytes, str]:
    """The safetensors bytes of blocks ``first..last`` (params and buffers) and their sha256.

    Keys carry global block indices (``"3.conv1.weight"``); the header's metadata records the
    model and range so ``load_stage`` can refuse bytes meant for another stage. The bytes are
    deterministic, so the digest is a stable content address for (model, seed, range).
    """
    data = st_save(_stage_tensors(name, seed, first, last), metadata=_metadata(name, first, last))
    return data, hashlib.sha256(data).hexdigest()


def write_stage_weights(name: str, seed: int, first: int, last: int, path: Path) -> str:
    """Write :func:`stage_weights`' bytes to ``path`` (atomically) and return their sha256.

    The file is written from the module's own tensors, so the peak is the stage once, not the
    stage plus its serialised bytes.
    """
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tensors = _stage_tensors(name, seed, first, last)
        st_save_file(tensors, tmp, metadata=_metadata(name, first, last))
        del tensors
        digest = file_sha256(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks (never the whole file in memory)."""
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _header_bytes(weights: bytes | Path) -> bytes:
    """The JSON header of safetensors bytes or of a safetensors file."""
    if isinstance(weights, Path):
        total = weights.stat().st_size
        with weights.open("rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if 0 <= size <= min(MAX_HEADER_BYTES, total - 8):
                return f.read(size)
    else:
        total = len(weights)
        size = struct.unpack("<Q", weights[:8])[0] if total >= 8 else -1
        if 0 <= size <= min(MAX_HEADER_BYTES, total - 8):
            return weights[8 : 8 + size]
    if total < 8:
        raise InvalidArgument("stage weights: too short to be safetensors")
    raise InvalidArgument("stage weights: bad safetensors header size")


def _stage_metadata(weights: bytes | Path) -> dict[str, object]:
    """The stage description ``stage_weights`` put in a safetensors header ({} if none)."""
    try:
        header = json.loads(_header_bytes(weights))
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
    weights: bytes | Path,
    *,
    device: str | torch.device = "cpu",
) -> nn.Sequential:
    """Blocks ``first..last`` of ``name`` holding ``weights``, in eval mode on ``device``.

    ``weights`` is safetensors bytes, or the path of a safetensors file: then the tensors map
    the file copy-on-write (nothing is read into a buffer first), so the file must not be
    changed in place while the stage lives; replacing or removing it is safe.

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
        tensors = st_load_file(weights) if isinstance(weights, Path) else st_load(weights)
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
