"""The WeightStore: builds a stage's seeded weights once, serves them by digest, in chunks.

A stage's safetensors file is written straight from the built module's tensors to disk
(``models.write_stage_weights``) and streamed to agents from there, one chunk at a time: the
coordinator holds a stage once while building it and never as bytes. Kept in memory, a stage
was the module, a copy of its tensors and the serialised bytes twice over while building, and
the store kept every recent stage's bytes (gpt2-medium's two plans took the coordinator to
5 GiB). The files live in a directory of the store's own, removed when the store goes away.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import grpc.aio

from doramesh import models
from doramesh.channels import CHUNK_BYTES
from doramesh.errors import FailedPrecondition, InvalidArgument
from doramesh.servicing import stream_errors
from doramesh.v1 import coordinator_pb2, coordinator_pb2_grpc


@dataclass(frozen=True, slots=True)
class StageKey:
    model: str
    seed: int
    first: int
    last: int


class WeightStore:
    """Stage weights as safetensors files, kept in an LRU bounded by total bytes on disk."""

    def __init__(self, max_bytes: int, root: Path | None = None) -> None:
        self.max_bytes = max_bytes
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="doramesh-weights-"))
            weakref.finalize(self, shutil.rmtree, root, True)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        #: Key -> (file, size, digest), least recently used first.
        self._by_key: OrderedDict[StageKey, tuple[Path, int, str]] = OrderedDict()
        #: One build at a time per key, and a lock only while someone wants that key: agents
        #: may ask for any seed, so a lock per key ever asked would grow without bound.
        self._locks: dict[StageKey, asyncio.Lock] = {}
        self._users: dict[StageKey, int] = {}

    async def get(self, key: StageKey) -> tuple[Path, str]:
        """The file holding ``key``'s weights, and their digest (built on first use)."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                path, _, digest = await self._get_or_build(key)
                return path, digest
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]

    async def open(self, key: StageKey) -> tuple[BinaryIO, int, str]:
        """``key``'s weights opened for reading, their size and digest. An open file stays
        readable when the store evicts it (the name goes, the data stays until closed)."""
        while True:
            path, digest = await self.get(key)
            try:
                f = path.open("rb")
            except FileNotFoundError:  # evicted between the build and the open: build again
                self._by_key.pop(key, None)
                continue
            return f, path.stat().st_size, digest

    async def _get_or_build(self, key: StageKey) -> tuple[Path, int, str]:
        hit = self._by_key.get(key)
        if hit is not None and hit[0].exists():
            self._by_key.move_to_end(key)
            return hit
        path = self.root / f"{key.model}-{key.seed}-{key.first}-{key.last}.safetensors"
        digest = await asyncio.to_thread(
            models.write_stage_weights, key.model, key.seed, key.first, key.last, path
        )
        entry = (path, path.stat().st_size, digest)
        self._by_key[key] = entry
        total = sum(size for _, size, _ in self._by_key.values())
        while total > self.max_bytes and len(self._by_key) > 1:
            _, (old, size, _) = self._by_key.popitem(last=False)
            old.unlink(missing_ok=True)
            total -= size
        return entry


class WeightStoreServicer(coordinator_pb2_grpc.WeightStoreServicer):
    def __init__(self, store: WeightStore) -> None:
        self.store = store

    @stream_errors
    async def FetchStage(
        self,
        request: coordinator_pb2.FetchStageRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[coordinator_pb2.WeightChunk]:
        models.require_served(request.model)
        if request.last < request.first:
            raise InvalidArgument("last layer is before first layer")
        key = StageKey(request.model, request.seed, request.first, request.last)
        f, total, digest = await self.store.open(key)
        with f:
            if request.digest and request.digest != digest:
                raise FailedPrecondition(
                    f"this store's weights for {request.model}[{request.first}:{request.last}] "
                    f"have digest {digest[:12]}, not {request.digest[:12]}"
                )
            for offset in range(0, max(total, 1), CHUNK_BYTES):
                data = await asyncio.to_thread(f.read, CHUNK_BYTES)
                yield coordinator_pb2.WeightChunk(
                    digest=digest if offset == 0 else "",
                    total_bytes=total,
                    offset=offset,
                    data=data,
                )
