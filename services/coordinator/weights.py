"""The WeightStore: builds a stage's seeded weights once, serves them by digest, in chunks."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

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
    """Stage weights as safetensors bytes, kept in an LRU bounded by total bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._by_key: OrderedDict[StageKey, tuple[bytes, str]] = OrderedDict()
        #: One build at a time per key, and a lock only while someone wants that key: agents
        #: may ask for any seed, so a lock per key ever asked would grow without bound.
        self._locks: dict[StageKey, asyncio.Lock] = {}
        self._users: dict[StageKey, int] = {}

    async def get(self, key: StageKey) -> tuple[bytes, str]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                return await self._get_or_build(key)
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]

    async def _get_or_build(self, key: StageKey) -> tuple[bytes, str]:
        hit = self._by_key.get(key)
        if hit is not None:
            self._by_key.move_to_end(key)
            return hit
        data, digest = await asyncio.to_thread(
            models.stage_weights, key.model, key.seed, key.first, key.last
        )
        self._by_key[key] = (data, digest)
        total = sum(len(d) for d, _ in self._by_key.values())
        while total > self.max_bytes and len(self._by_key) > 1:
            _, (old, _) = self._by_key.popitem(last=False)
            total -= len(old)
        return data, digest


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
        data, digest = await self.store.get(key)
        if request.digest and request.digest != digest:
            raise FailedPrecondition(
                f"this store's weights for {request.model}[{request.first}:{request.last}] have "
                f"digest {digest[:12]}, not {request.digest[:12]}"
            )
        view = memoryview(data)
        for offset in range(0, max(len(data), 1), CHUNK_BYTES):
            yield coordinator_pb2.WeightChunk(
                digest=digest if offset == 0 else "",
                total_bytes=len(data),
                offset=offset,
                data=bytes(view[offset : offset + CHUNK_BYTES]),
            )
