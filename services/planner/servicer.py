"""The Planner gRPC service: a thin servicer over ``api.plan`` and the server that hosts it.

The servicer only converts and delegates. Solving is CPU-bound and can take seconds, so it runs
in a worker thread (the event loop keeps answering health checks and other calls), bounded by
a semaphore and by the caller's deadline.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from doramesh import channels, convert
from doramesh.errors import InvalidArgument
from doramesh.servicing import unary_errors
from doramesh.v1 import planner_pb2, planner_pb2_grpc

from . import api, dp

_log = structlog.get_logger("planner")

SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["Planner"].full_name
DEFAULT_ADDRESS = "0.0.0.0:7071"
#: Plans solved at once; further requests wait (each solve holds a CPU core).
DEFAULT_MAX_CONCURRENT_PLANS = 4
#: Share of the caller's remaining deadline the solver may use; the rest is for the reply.
DEADLINE_SHARE = 0.8
#: Largest inputs a request may carry: the DP's tables grow with layers squared.
MAX_DEVICES = 1024
MAX_LAYERS = 256
MAX_LINKS = 1 << 16


class PlannerServicer(planner_pb2_grpc.PlannerServicer):
    """``doramesh.v1.Planner``: request -> domain values -> ``api.plan`` -> response."""

    def __init__(self, *, max_concurrent_plans: int = DEFAULT_MAX_CONCURRENT_PLANS) -> None:
        self._slots = asyncio.Semaphore(max_concurrent_plans)

    @unary_errors
    async def Plan(
        self,
        request: planner_pb2.PlanRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> planner_pb2.PlanResponse:
        if not request.HasField("model"):
            raise InvalidArgument("model (the layer table) is required")
        if not request.HasField("network"):
            raise InvalidArgument("network is required")
        if len(request.devices) > MAX_DEVICES:
            raise InvalidArgument(f"at most {MAX_DEVICES} devices, got {len(request.devices)}")
        if len(request.model.layers) > MAX_LAYERS:
            raise InvalidArgument(
                f"model has {len(request.model.layers)} layers; the planner takes at most "
                f"{MAX_LAYERS} (merge adjacent layers first)"
            )
        if len(request.network.links) > MAX_LINKS:
            raise InvalidArgument(f"at most {MAX_LINKS} links, got {len(request.network.links)}")
        devices = [convert.profile_from_pb(d) for d in request.devices]
        table = convert.layer_table_from_pb(request.model)
        network = convert.network_from_pb(request.network)
        workload = convert.workload_from_pb(request.workload)
        qoe = convert.qoe_from_pb(request.qoe)
        planner = request.planner or api.DEFAULT_PLANNER
        max_plans = request.max_plans or api.DEFAULT_MAX_PLANS
        time_limit = request.time_limit_s or dp.DEFAULT_TIME_LIMIT_S
        remaining = context.time_remaining()
        if remaining is not None:
            time_limit = min(time_limit, max(remaining * DEADLINE_SHARE, 0.01))

        async with self._slots:
            start = time.perf_counter()
            plan_set = await asyncio.to_thread(
                api.plan,
                devices,
                table,
                network,
                workload,
                qoe,
                max_plans=max_plans,
                planner=planner,
                time_limit_s=time_limit,
            )
            seconds = time.perf_counter() - start
        _log.info(
            "planned",
            model=table.model,
            devices=len(devices),
            layers=len(table.layers),
            objective=qoe.objective,
            plans=len(plan_set.plans),
            seconds=round(seconds, 3),
        )
        return planner_pb2.PlanResponse(
            plan_set=convert.plan_set_to_pb(plan_set), plan_seconds=seconds, planner=planner
        )


class PlannerServer:
    """The planner daemon's gRPC server: Planner plus grpc.health.v1."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        max_concurrent_plans: int = DEFAULT_MAX_CONCURRENT_PLANS,
    ) -> None:
        self._requested = address
        self._max_concurrent = max_concurrent_plans
        self._server: grpc.aio.Server | None = None
        # grpc_health.v1.health.aio.HealthServicer; the installed stubs predate its aio module.
        self._health: Any = None
        self.address: str | None = None

    async def start(self) -> str:
        """Bind and start serving; returns the bound ``host:port`` (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("planner server already started")
        # Import the solver stack now (1-4 s), not inside the first request's deadline.
        await asyncio.to_thread(api.warm_up)
        server = channels.create_server("planner")
        planner_pb2_grpc.add_PlannerServicer_to_server(
            PlannerServicer(max_concurrent_plans=self._max_concurrent), server
        )
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        address = channels.bind(server, self._requested)
        await server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await checker.set("", serving)
        await checker.set(SERVICE_NAME, serving)
        self._server, self._health, self.address = server, checker, address
        _log.info("planner serving", address=address)
        return address

    async def stop(self, grace: float | None = 1.0) -> None:
        """Report NOT_SERVING, let calls in flight finish for ``grace`` seconds, then stop."""
        server, checker = self._server, self._health
        if server is None:
            return
        if checker is not None:
            await checker.enter_graceful_shutdown()
        await server.stop(grace)
        self._server = self._health = None
        _log.info("planner stopped", address=self.address)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> PlannerServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(address: str = DEFAULT_ADDRESS, *, stop_event: asyncio.Event | None = None) -> None:
    """Run a planner server until ``stop_event`` is set (or forever), then drain it."""
    server = PlannerServer(address)
    await server.start()
    try:
        if stop_event is None:
            await server.wait_for_termination()
        else:
            await stop_event.wait()
    finally:
        await server.stop(5.0)
