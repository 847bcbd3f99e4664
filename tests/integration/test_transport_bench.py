"""``doramesh bench transport`` end to end, with tiny settings.

The host is shared and noisy, so this checks that every figure is measured and positive, never
that it beats a threshold; the full-size run is ``make bench-transport``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
import torch
from rich.console import Console

from doramesh import channels
from doramesh.bench import transport
from doramesh.bench.transport import main, render_table, run_transport_bench
from doramesh.streams import FRAME_BYTES, add_agent_servicer
from doramesh.tensors import iter_frames
from doramesh.v1 import agent_pb2, agent_pb2_grpc

KIB = 1 << 10
MIB = 1 << 20


async def test_bench_structure_and_positive_figures() -> None:
    result = await run_transport_bench((64 * KIB, MIB), seconds_per_size=0.2, latency_iterations=20)
    assert [row["bytes"] for row in result["sizes"]] == [64 * KIB, MIB]
    for row in result["sizes"]:
        assert row["grpc_mb_per_s"] > 0 and row["raw_tcp_mb_per_s"] > 0
        assert row["grpc_bytes_floor_mb_per_s"] > 0
        assert row["ratio"] == pytest.approx(
            row["grpc_mb_per_s"] / row["raw_tcp_mb_per_s"], rel=0.01
        )
        assert row["floor_ratio"] == pytest.approx(
            row["grpc_bytes_floor_mb_per_s"] / row["raw_tcp_mb_per_s"], rel=0.01
        )
        runs = row["runs_mb_per_s"]
        assert len(runs["grpc"]) == len(runs["grpc_bytes_floor"]) == result["rounds"]
        assert all(r > 0 for r in runs["grpc"] + runs["grpc_bytes_floor"] + runs["raw_tcp"])
        costs = row["cpu_s_per_gb"]
        assert set(costs) == {"grpc", "grpc_bytes_floor", "raw_tcp"}
        assert all(c is None or c >= 0 for c in costs.values())
    hop = result["small_tensor_hop_ms"]
    assert hop["iterations"] == 20 and hop["bytes"] == 4 * KIB
    assert 0 < hop["p50"] <= hop["p95"]
    assert 0 < hop["raw_tcp_p50"] <= hop["raw_tcp_p95"]
    assert result["chunk_bytes"] == FRAME_BYTES
    assert isinstance(result["allocator_tuned"], bool)
    json.dumps(result)  # the --json output

    console = Console(width=120, record=True)
    console.print(render_table(result))
    text = console.export_text()
    assert "64 KiB" in text and "1 MiB" in text and "raw TCP" in text and "bare gRPC" in text


def test_floor_messages_match_the_wire_frames() -> None:
    # The bare-gRPC floor sends as many bytes, in as many messages, as the activation stream.
    tensor = torch.zeros(300_000)
    messages = transport._floor_messages(tensor, 256 * KIB)
    # 1_200_000 bytes in 256 KiB pieces: a header with the first, then four chunks.
    assert len(messages) == 5
    assert sum(len(m) for m in messages) > tensor.numel() * 4
    assert [m[0] for m in messages] == [0, 0, 0, 0, 1]


async def test_chunking_below_tensor_size_is_measured() -> None:
    # 256 KiB frames make each 1 MiB tensor four frames (a header, three chunks), as on a paced
    # link.
    result = await run_transport_bench(
        (MIB,), seconds_per_size=0.2, chunk_bytes=256 * KIB, rounds=1, latency_iterations=5
    )
    assert result["chunk_bytes"] == 256 * KIB
    assert result["sizes"][0]["grpc_mb_per_s"] > 0


def test_main_prints_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    main(str(out), sizes=(64 * KIB,), seconds_per_size=0.1, rounds=1, latency_iterations=5)
    written = json.loads(out.read_text())
    assert written["sizes"][0]["bytes"] == 64 * KIB
    assert "gRPC MB/s" in capsys.readouterr().out


async def test_bench_sink_refuses_malformed_streams() -> None:
    # The harness uses the production codec and assembler, so a bad frame ends the stream with a
    # status; the client here is protobuf's own codec, as any other peer's could be.
    server = channels.create_server("bench-sink-test")
    add_agent_servicer(
        transport.TransportBenchSink(max_tensor_bytes=MIB, max_chunk_bytes=64 * KIB), server
    )
    address = channels.bind(server, "127.0.0.1:0")
    await server.start()
    try:
        async with channels.create_channel(address) as channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            frames = list(
                iter_frames(
                    torch.zeros(1024),
                    stage_id="s",
                    plan_epoch=0,
                    request_id="r",
                    microbatch_id=1,
                    chunk_bytes=1024,
                )
            )
            call = stub.Forward(timeout=10)
            for frame in frames:
                await call.write(frame)
            ack = await call.read()
            assert ack.header.microbatch_id == 1 and ack.header.meta.byte_length == 0
            await call.write(
                agent_pb2.ActivationFrame(
                    chunk=agent_pb2.ActivationChunk(microbatch_id=9, offset=0, data=b"x")
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "microbatch 9" in (err.value.details() or "")
    finally:
        await server.stop(grace=None)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        asyncio.run(run_transport_bench((), seconds_per_size=0.1))
