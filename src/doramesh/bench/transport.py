"""``doramesh bench transport``: what the activation path costs compared with a bare socket.

Activations travel peer to peer as frames of up to 1 MiB over a bidirectional gRPC stream: a
header carrying the tensor's first bytes, then chunks with the rest. This benchmark measures that
path as agents run it: the sender is a ``PeerLink`` (its channel, frame codec and write path),
the receiver is registered with ``add_agent_servicer`` on a server from ``channels.create_server``
and assembles every microbatch with ``FrameAssembler``; it compares that with the best a
hand-written transport could do on the same host: a raw TCP socket that sends the tensor's bytes
with a length prefix and lands them in a preallocated buffer. Both run the same workload (one
tensor per microbatch, a window of microbatches in flight, a tiny answer per tensor), so their
ratio is the price of gRPC, HTTP/2 and the codec. A third transport separates the two: the same
messages (sizes, the header frame with the first bytes, chunks, one answer per tensor) as
prebuilt bytes on a bare gRPC stream, with no codec, no tensors and no copies in Python. It is
what grpcio itself costs, the ceiling of any codec on top of it. It also measures the round trip
of one small tensor, which bounds the per-hop latency of a pipeline, and, for each transport, the
CPU both processes spend per GB: on a shared host the throughputs move with the neighbours' load,
the CPU cost much less.

What bounds the ratio (profiled with py-spy and perf on a 2-vCPU host, load average ~5): both
gRPC processes are CPU-bound, so the throughput ratio follows the CPU cost per byte, ~0.4 s/GB
for the socket, 1.0-1.4 for bare gRPC and 1.5-2.1 for the stream at 1 MiB and above. The bare
column is grpcio's own price: on send, cygrpc copies the serialised bytes into a slice and, on
this path, the kernel's copy of the TCP write runs on the Python thread (two thirds of the
sender's busy samples are inside ``call.write``); on receive, cygrpc copies every received slice
into a bytearray and that into bytes, under the interpreter lock, and every message costs an
event-loop wake-up on each side. The stream adds one copy per side: ``encode_frame``'s join
(about a tenth of the sender's samples) and the assembler's copy into a tensor the receiver owns
(10-15% of the receiver's). Neither can go while grpcio takes and hands out only ``bytes`` and
the runtime gets a tensor it may write. One message fewer per tensor (the header frame carries
the first 1 MiB) and frames of 4 MiB instead of 1 MiB did not measurably lower the CPU per byte
of either gRPC column, and two links (connections) to the peer did not raise the stream's rate
(alternating runs; a second HTTP/2 stream on bare gRPC helped in one run and hurt in another).
So the stream stays below 60% of the socket at 1 MiB on this host, and passes it at 4 and 16 MiB
only in runs where the socket's rounds were slowed by the neighbours.

The receiving side runs in a separate process, as a peer agent would: in one process the sender
and receiver would share one interpreter lock and the figures would describe that, not the wire.
Every figure comes from running this module; nothing is hard-coded.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import grpc
import grpc.aio
import structlog
import torch
from rich.console import Console
from rich.table import Table

from doramesh import channels
from doramesh.servicing import stream_errors
from doramesh.streams import FRAME_BYTES, PeerLink, add_agent_servicer
from doramesh.tensors import (
    Frame,
    FrameAssembler,
    encode_frame,
    iter_wire_frames,
    tune_allocator_for_streaming,
)
from doramesh.v1 import agent_pb2, agent_pb2_grpc, common_pb2

_log = structlog.get_logger("bench.transport")

KIB = 1 << 10
MIB = 1 << 20
DEFAULT_SIZES: tuple[int, ...] = (64 * KIB, 1 * MIB, 4 * MIB, 16 * MIB)
#: Microbatches in flight per stream: enough to keep the link busy while the receiver assembles,
#: as a pipeline stage does.
DEFAULT_WINDOW = 4
#: The small tensor of the latency probe: a token's hidden state in a small model is ~1-4 KiB.
LATENCY_BYTES = 4 * KIB
LATENCY_ITERATIONS = 200
_RAW_PREFIX_BYTES = 8
_ACK = b"\x01"
_STAGE_ID = "bench-transport"
#: How long the parent waits for the sink process to start (it imports torch and grpc).
_SINK_START_TIMEOUT_S = 120.0
#: Deadline of each benchmark stream: generous, but a wedged sink must not hang the bench.
_STREAM_DEADLINE_S = 600.0


# --- the receiving side (a separate process) -------------------------------------------------


class TransportBenchSink(agent_pb2_grpc.AgentServicer):
    """Benchmark harness, not product: receives activation streams and acks each microbatch.

    It does what a stage's receiving side must do before it can compute (validate and assemble
    every frame into a tensor) and nothing more, so the measured rate is the transport's.
    """

    def __init__(self, max_tensor_bytes: int, max_chunk_bytes: int) -> None:
        self._max_tensor_bytes = max_tensor_bytes
        self._max_chunk_bytes = max_chunk_bytes

    @stream_errors
    async def Forward(
        self,
        request_iterator: AsyncIterator[Frame],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Frame]:
        assembler = FrameAssembler(self._max_tensor_bytes, self._max_chunk_bytes)
        async for frame in request_iterator:
            done = assembler.feed(frame)
            if done is not None:
                header, _tensor = done
                yield _ack_frame(header.microbatch_id)


#: The bytes-only floor's method: messages are opaque bytes; a first byte of 1 ends a tensor.
_FLOOR_SERVICE = "doramesh.bench.TransportFloor"
_FLOOR_METHOD = f"/{_FLOOR_SERVICE}/Stream"
_FLOOR_LAST = 1


async def _floor_sink(
    request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    """Answers every message that ends a tensor with one byte, touching nothing else."""
    async for message in request_iterator:
        if message[:1] == bytes([_FLOOR_LAST]):
            yield _ACK


def _ack_frame(microbatch_id: int) -> agent_pb2.ActivationFrame:
    return agent_pb2.ActivationFrame(
        header=agent_pb2.ActivationHeader(
            stage_id=_STAGE_ID,
            microbatch_id=microbatch_id,
            meta=common_pb2.TensorMeta(dtype="float32", shape=[0], byte_length=0),
        )
    )


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fills ``view`` from ``sock``; False if the peer closed first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _raw_sink_connection(sock: socket.socket, max_tensor_bytes: int) -> None:
    """The raw baseline's receiver: length prefix, bytes into a fresh buffer, a tensor, an ack."""
    prefix = bytearray(_RAW_PREFIX_BYTES)
    with sock:
        while _recv_exact(sock, memoryview(prefix)):
            n = int.from_bytes(prefix, "little")
            if n > max_tensor_bytes:
                return
            raw = torch.empty(n, dtype=torch.uint8)
            if n and not _recv_exact(sock, raw.numpy().data):
                return
            # Build the tensor a stage would compute on, as the gRPC sink does.
            _tensor = raw.view(torch.float32) if n % 4 == 0 else raw
            sock.sendall(_ACK)


def _raw_sink_accept(listener: socket.socket, max_tensor_bytes: int) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:  # the listener was closed: the bench is over
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(
            target=_raw_sink_connection, args=(sock, max_tensor_bytes), daemon=True
        ).start()


async def _serve_sinks(
    conn: multiprocessing.connection.Connection, max_tensor_bytes: int, chunk_bytes: int
) -> None:
    server = channels.create_server("bench-transport-sink")
    add_agent_servicer(TransportBenchSink(max_tensor_bytes, chunk_bytes), server)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                _FLOOR_SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(_floor_sink)}
            )
        ]
    )
    grpc_address = channels.bind(server, "127.0.0.1:0")
    await server.start()
    listener = socket.create_server(("127.0.0.1", 0))
    raw_port = listener.getsockname()[1]
    threading.Thread(
        target=_raw_sink_accept, args=(listener, max_tensor_bytes), daemon=True
    ).start()
    conn.send((grpc_address, raw_port))
    try:
        await asyncio.to_thread(conn.recv)  # the parent says stop (or dies: EOFError)
    except EOFError:
        pass
    finally:
        listener.close()
        await server.stop(grace=1.0)


def _sink_process_main(
    conn: multiprocessing.connection.Connection,
    max_tensor_bytes: int,
    chunk_bytes: int,
    tune_allocator: bool,
) -> None:
    """Entry point of the sink process (module level so that ``spawn`` can import it)."""
    if tune_allocator:
        tune_allocator_for_streaming()
    asyncio.run(_serve_sinks(conn, max_tensor_bytes, chunk_bytes))


class _SinkProcess:
    """Starts the sinks in a child process; ``spawn`` because forking a gRPC process is unsafe."""

    def __init__(self, max_tensor_bytes: int, chunk_bytes: int, tune_allocator: bool) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=_sink_process_main,
            args=(child_conn, max_tensor_bytes, chunk_bytes, tune_allocator),
            name="doramesh-bench-transport-sink",
            daemon=True,
        )
        self._child_conn = child_conn

    @property
    def pid(self) -> int | None:
        return self._process.pid

    async def __aenter__(self) -> tuple[str, int]:
        self._process.start()
        self._child_conn.close()
        ready = await asyncio.to_thread(self._conn.poll, _SINK_START_TIMEOUT_S)
        if not ready:
            await self._stop()
            raise RuntimeError(
                f"benchmark sink process did not start within {_SINK_START_TIMEOUT_S:.0f} s"
            )
        try:
            grpc_address, raw_port = self._conn.recv()
        except EOFError:
            await self._stop()
            raise RuntimeError(
                f"benchmark sink process exited with code {self._process.exitcode}"
            ) from None
        return str(grpc_address), int(raw_port)

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        try:
            self._conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        await asyncio.to_thread(self._process.join, 10.0)
        if self._process.is_alive():
            self._process.terminate()
            await asyncio.to_thread(self._process.join, 5.0)
        self._conn.close()


# --- the sending side ------------------------------------------------------------------------


def _payload(nbytes: int) -> torch.Tensor:
    """A float32 activation of ``nbytes`` (rounded down to whole elements, at least one)."""
    gen = torch.Generator().manual_seed(nbytes)
    return torch.randn(max(nbytes // 4, 1), generator=gen)


async def _grpc_goodput(
    link: PeerLink, tensor: torch.Tensor, *, seconds: float, window: int
) -> float:
    """Bytes per second acked over a ``PeerLink`` with ``window`` microbatches in flight.

    ``window`` tasks each send a microbatch and await its answer, as the stages of a pipeline
    share one link; their frames are interleaved per microbatch by the link's write lock.
    """
    nbytes = tensor.numel() * tensor.element_size()
    acked = 0
    last_ack = time.perf_counter()
    measuring = False
    deadline = 0.0

    async def send_one() -> None:
        nonlocal acked, last_ack
        await link.exchange(
            tensor,
            stage_id=_STAGE_ID,
            plan_epoch=0,
            request_id="bench",
            timeout=_STREAM_DEADLINE_S,
        )
        last_ack = time.perf_counter()
        if measuring:
            acked += 1

    async def sender() -> None:
        while time.perf_counter() < deadline:
            await send_one()

    # Warm up (connection, allocator, HTTP/2 windows), then measure from an empty pipeline.
    await asyncio.gather(*(send_one() for _ in range(window)))
    measuring = True
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(sender() for _ in range(window)))
    return acked * nbytes / max(last_ack - start, 1e-9)


def _floor_messages(tensor: torch.Tensor, chunk_bytes: int) -> list[bytes]:
    """Opaque messages as long as the wire frames of one microbatch of ``tensor``."""
    frames = [
        encode_frame(f)
        for f in iter_wire_frames(
            tensor,
            stage_id=_STAGE_ID,
            plan_epoch=0,
            request_id="bench",
            microbatch_id=1 << 20,
            chunk_bytes=chunk_bytes,
        )
    ]
    last = len(frames) - 1
    return [bytes([_FLOOR_LAST if i == last else 0]) * len(f) for i, f in enumerate(frames)]


async def _grpc_floor_goodput(
    channel: grpc.aio.Channel, messages: list[bytes], nbytes: int, *, seconds: float, window: int
) -> float:
    """Bytes per second of tensors answered on a bare gRPC stream of prebuilt messages."""
    call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(_FLOOR_METHOD)(
        timeout=_STREAM_DEADLINE_S
    )
    slots = asyncio.Semaphore(window)
    acked = 0
    last_ack = time.perf_counter()
    measuring = False

    async def read_answers() -> None:
        nonlocal acked, last_ack
        while await call.read() is not grpc.aio.EOF:
            last_ack = time.perf_counter()
            if measuring:
                acked += 1
            slots.release()

    async def send() -> None:
        await slots.acquire()
        for message in messages:
            await call.write(message)

    reader = asyncio.create_task(read_answers())
    try:
        for _ in range(window):
            await send()
        for _ in range(window):  # warmed up once every slot is free again
            await slots.acquire()
        for _ in range(window):
            slots.release()
        measuring = True
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            await send()
        await call.done_writing()
        await reader
    finally:
        if not reader.done():
            reader.cancel()
            call.cancel()
    return acked * nbytes / max(last_ack - start, 1e-9)


def _raw_tcp_goodput(port: int, tensor: torch.Tensor, *, seconds: float, window: int) -> float:
    """The same workload over a bare socket: length prefix, bytes, a 1-byte ack per tensor."""
    view = tensor.contiguous().view(torch.uint8).numpy().data
    prefix = len(view).to_bytes(_RAW_PREFIX_BYTES, "little")
    slots = threading.Semaphore(window)
    acked = 0
    last_ack = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(_STREAM_DEADLINE_S)

        def read_acks() -> None:
            nonlocal acked, last_ack
            buf = bytearray(64)
            while True:
                try:
                    n = sock.recv_into(buf)
                except OSError:  # shut down by the sender below once every ack is in
                    return
                if n == 0:
                    return
                acked += n
                last_ack = time.perf_counter()
                slots.release(n)

        reader = threading.Thread(target=read_acks, daemon=True)
        reader.start()

        def send() -> None:
            slots.acquire()
            sock.sendall(prefix)
            sock.sendall(view)

        def wait_for_acks(count: int) -> None:
            # The reader thread timestamps each ack; polling here only delays the return.
            until = time.perf_counter() + _STREAM_DEADLINE_S
            while acked < count:
                if time.perf_counter() > until or not reader.is_alive():
                    raise RuntimeError("benchmark raw sink stopped acknowledging")
                time.sleep(0.0002)

        for _ in range(window):
            send()
        wait_for_acks(window)
        start = time.perf_counter()
        deadline = start + seconds
        sent = window
        while True:
            send()
            sent += 1
            if time.perf_counter() >= deadline:
                break
        wait_for_acks(sent)
        sock.shutdown(socket.SHUT_RDWR)
        reader.join()
        measured = acked - window
    return measured * len(view) / max(last_ack - start, 1e-9)


async def _grpc_round_trips(link: PeerLink, iterations: int) -> list[float]:
    """Seconds to send one small tensor and receive its answer, one at a time on one link."""
    tensor = _payload(LATENCY_BYTES)
    times: list[float] = []
    warmup = 10
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        await link.exchange(
            tensor,
            stage_id=_STAGE_ID,
            plan_epoch=0,
            request_id="bench",
            timeout=_STREAM_DEADLINE_S,
        )
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _raw_round_trips(port: int, iterations: int) -> list[float]:
    view = _payload(LATENCY_BYTES).view(torch.uint8).numpy().data
    prefix = len(view).to_bytes(_RAW_PREFIX_BYTES, "little")
    ack = bytearray(1)
    times: list[float] = []
    warmup = 10
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(_STREAM_DEADLINE_S)
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            sock.sendall(prefix)
            sock.sendall(view)
            if not _recv_exact(sock, memoryview(ack)):
                raise RuntimeError("benchmark raw sink closed the connection")
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def _cpu_seconds(sink_pid: int | None) -> float | None:
    """CPU time used so far by this process and the sink process (all threads, user + system);
    None where the sink's cannot be read (no /proc)."""
    try:
        with open(f"/proc/{sink_pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    sink = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return time.process_time() + sink


async def _measured(
    run: Callable[[], Awaitable[float]], sink_pid: int | None
) -> tuple[float, float | None]:
    """Runs one goodput trial; returns its bytes/s and the CPU seconds both processes spent per
    GB moved (warm-up included), the cost of a transport whatever share of the host it got."""
    cpu0, wall0 = _cpu_seconds(sink_pid), time.perf_counter()
    bps = await run()
    cpu1, wall1 = _cpu_seconds(sink_pid), time.perf_counter()
    if cpu0 is None or cpu1 is None or bps <= 0:
        return bps, None
    return bps, (cpu1 - cpu0) / (bps * (wall1 - wall0) / 1e9)


def _percentiles_ms(times: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(times)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return round(p50 * 1e3, 3), round(p95 * 1e3, 3)


async def run_transport_bench(
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    seconds_per_size: float = 1.0,
    chunk_bytes: int = FRAME_BYTES,
    window: int = DEFAULT_WINDOW,
    rounds: int = 3,
    latency_iterations: int = LATENCY_ITERATIONS,
    tune_allocator: bool = True,
) -> dict[str, Any]:
    """Measures gRPC activation streaming against a raw socket, size by size, and hop latency.

    Throughputs are goodput in MB/s (1e6 bytes/s) of tensor bytes acked by the receiver: the
    median of ``rounds`` alternating runs per transport, ``seconds_per_size`` in all for each.
    ``tune_allocator`` applies ``tune_allocator_for_streaming`` to both processes, as an agent
    daemon does (it changes this process's allocator for good); False measures glibc's defaults.
    """
    if not sizes or min(sizes) <= 0 or min(seconds_per_size, window, rounds) <= 0:
        raise ValueError("sizes, seconds_per_size, window and rounds must be positive")
    max_tensor_bytes = max(*sizes, LATENCY_BYTES)
    allocator_tuned = tune_allocator and tune_allocator_for_streaming()
    rows: list[dict[str, Any]] = []
    sink = _SinkProcess(max_tensor_bytes, chunk_bytes, allocator_tuned)
    async with sink as (grpc_address, raw_port):
        link = PeerLink(grpc_address, chunk_bytes=chunk_bytes)
        floor_channel = channels.create_channel(grpc_address)
        try:
            for nbytes in sizes:
                tensor = _payload(nbytes)
                actual = tensor.numel() * tensor.element_size()
                # Alternating short runs and taking each transport's median keeps a burst from
                # a noisy neighbour from landing on one transport only.
                seconds = seconds_per_size / rounds
                floor_messages = _floor_messages(tensor, chunk_bytes)
                trials: dict[str, Callable[[], Awaitable[float]]] = {
                    "grpc": partial(_grpc_goodput, link, tensor, seconds=seconds, window=window),
                    "grpc_bytes_floor": partial(
                        _grpc_floor_goodput,
                        floor_channel,
                        floor_messages,
                        actual,
                        seconds=seconds,
                        window=window,
                    ),
                    "raw_tcp": partial(
                        asyncio.to_thread,
                        _raw_tcp_goodput,
                        raw_port,
                        tensor,
                        seconds=seconds,
                        window=window,
                    ),
                }
                runs: dict[str, list[float]] = {name: [] for name in trials}
                cpu: dict[str, list[float]] = {name: [] for name in trials}
                for _ in range(rounds):
                    for name, trial in trials.items():
                        bps, cpu_per_gb = await _measured(trial, sink.pid)
                        runs[name].append(bps)
                        if cpu_per_gb is not None:
                            cpu[name].append(cpu_per_gb)
                grpc_runs, floor_runs, raw_runs = (
                    runs["grpc"],
                    runs["grpc_bytes_floor"],
                    runs["raw_tcp"],
                )
                grpc_bps = statistics.median(grpc_runs)
                floor_bps = statistics.median(floor_runs)
                raw_bps = statistics.median(raw_runs)
                row = {
                    "bytes": actual,
                    "grpc_mb_per_s": round(grpc_bps / 1e6, 1),
                    "grpc_bytes_floor_mb_per_s": round(floor_bps / 1e6, 1),
                    "raw_tcp_mb_per_s": round(raw_bps / 1e6, 1),
                    "ratio": round(grpc_bps / raw_bps, 3),
                    "floor_ratio": round(floor_bps / raw_bps, 3),
                    "runs_mb_per_s": {
                        "grpc": [round(r / 1e6, 1) for r in grpc_runs],
                        "grpc_bytes_floor": [round(r / 1e6, 1) for r in floor_runs],
                        "raw_tcp": [round(r / 1e6, 1) for r in raw_runs],
                    },
                    "cpu_s_per_gb": {
                        name: round(statistics.median(v), 2) if v else None
                        for name, v in cpu.items()
                    },
                }
                _log.info(
                    "transport bench size done",
                    bytes=actual,
                    grpc_mb_per_s=row["grpc_mb_per_s"],
                    raw_tcp_mb_per_s=row["raw_tcp_mb_per_s"],
                )
                rows.append(row)
            grpc_times = await _grpc_round_trips(link, latency_iterations)
        finally:
            await link.close()
            await floor_channel.close()
        raw_times = await asyncio.to_thread(_raw_round_trips, raw_port, latency_iterations)
    grpc_p50, grpc_p95 = _percentiles_ms(grpc_times)
    raw_p50, raw_p95 = _percentiles_ms(raw_times)
    return {
        "sizes": rows,
        "small_tensor_hop_ms": {
            "bytes": LATENCY_BYTES,
            "iterations": latency_iterations,
            "p50": grpc_p50,
            "p95": grpc_p95,
            "raw_tcp_p50": raw_p50,
            "raw_tcp_p95": raw_p95,
        },
        "chunk_bytes": chunk_bytes,
        "window": window,
        "rounds": rounds,
        "seconds_per_size": seconds_per_size,
        "allocator_tuned": allocator_tuned,
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "torch": torch.__version__,
        },
    }


def _size_label(nbytes: int) -> str:
    if nbytes >= MIB and nbytes % MIB == 0:
        return f"{nbytes // MIB} MiB"
    if nbytes >= KIB and nbytes % KIB == 0:
        return f"{nbytes // KIB} KiB"
    return f"{nbytes} B"


def render_table(result: dict[str, Any]) -> Table:
    """The result as a table; the hop latency goes in the caption."""
    table = Table(
        title=f"activation transport on loopback ({_size_label(result['chunk_bytes'])} chunks, "
        f"{result['window']} microbatches in flight)"
    )
    table.add_column("tensor", justify="right")
    table.add_column("gRPC MB/s", justify="right")
    table.add_column("raw TCP MB/s", justify="right")
    table.add_column("gRPC / raw", justify="right")
    table.add_column("bare gRPC bytes MB/s", justify="right")
    table.add_column("bare / raw", justify="right")
    table.add_column("CPU s/GB gRPC, bare, raw", justify="right")

    def cpu(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for row in result["sizes"]:
        costs = row["cpu_s_per_gb"]
        table.add_row(
            _size_label(row["bytes"]),
            f"{row['grpc_mb_per_s']:.1f}",
            f"{row['raw_tcp_mb_per_s']:.1f}",
            f"{row['ratio']:.0%}",
            f"{row['grpc_bytes_floor_mb_per_s']:.1f}",
            f"{row['floor_ratio']:.0%}",
            ", ".join(cpu(costs[k]) for k in ("grpc", "grpc_bytes_floor", "raw_tcp")),
        )
    hop = result["small_tensor_hop_ms"]
    table.caption = (
        f"{_size_label(hop['bytes'])} tensor round trip over gRPC: p50 {hop['p50']:.3f} ms, "
        f"p95 {hop['p95']:.3f} ms (raw TCP p50 {hop['raw_tcp_p50']:.3f} ms, "
        f"p95 {hop['raw_tcp_p95']:.3f} ms); MB = 1e6 bytes; bare = the same messages as "
        "prebuilt bytes on a bare gRPC stream; CPU = both processes, per GB moved"
    )
    return table


def main(json_out: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Runs the benchmark, prints the table, and writes the JSON result to ``json_out`` if given.

    ``kwargs`` are passed to ``run_transport_bench`` (sizes, seconds_per_size, ...).
    """
    result = asyncio.run(run_transport_bench(**kwargs))
    Console().print(render_table(result))
    if json_out is not None:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
