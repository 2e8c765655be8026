"""SIGTERM: the listener closes, keep-alive requests get 503, a body still arriving is finished."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

import asyncpg
import orjson
import pytest

from flespi_receiver.embedded import free_port

from helpers import (
    TOKEN,
    config_file,
    count,
    flespi_message,
    log_events,
    receiver_process,
    wait_until_serving,
)


def request_head(length: int) -> bytes:
    return (
        b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n"
    )


async def receive(raw: socket.socket) -> bytes:
    raw.settimeout(10)
    return await asyncio.to_thread(raw.recv, 65536)


async def test_sigterm_finishes_a_body_still_arriving_and_turns_new_requests_away(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    arriving = orjson.dumps([flespi_message(i) for i in range(3)])
    other = orjson.dumps([flespi_message(10)])
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        slow = socket.create_connection(("127.0.0.1", port))
        idle = socket.create_connection(("127.0.0.1", port))
        try:
            slow.sendall(request_head(len(arriving)) + arriving[:40])
            idle.sendall(request_head(len(other)) + other)
            assert (await receive(idle)).startswith(b"HTTP/1.1 200")  # now idle, kept alive
            await asyncio.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            # a request on the open keep-alive connection: 503, and the connection is closed
            idle.sendall(request_head(len(other)) + other)
            refused = await receive(idle)
            assert refused.startswith(b"HTTP/1.1 503"), refused
            assert b"Retry-After: " in refused
            assert b"Connection: close" in refused
            # a new connection: the listener is closed
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                raise AssertionError("a new connection was accepted during the drain")
            except ConnectionRefusedError:
                pass
            # the body that was arriving is read to its end and answered
            slow.sendall(arriving[40:])
            answer = await receive(slow)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b'"stored":3' in answer
        finally:
            slow.close()
            idle.close()
        assert await asyncio.to_thread(process.wait, 20) == 0
    assert await count(db) == 4
    batches = [e for e in log_events(config) if e["event"] == "batch"]
    assert sorted(e["status"] for e in batches) == [200, 200, 503]


@pytest.mark.parametrize("messages", [3, 400], ids=["read-whole", "stored-while-arriving"])
async def test_a_body_unfinished_at_shutdown_timeout_gets_503_and_nothing_is_kept(
    tmp_path: Path, database_url: str, db: asyncpg.Connection, messages: int
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    config.write_text(config.read_text().replace("shutdown_timeout = 20", "shutdown_timeout = 1"))
    body = orjson.dumps([flespi_message(i) for i in range(messages)])
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        stalled = socket.create_connection(("127.0.0.1", port))
        try:
            stalled.sendall(request_head(len(body)) + body[: len(body) // 2])
            await asyncio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            answer = await receive(stalled)  # the rest never comes
        finally:
            stalled.close()
        assert await asyncio.to_thread(process.wait, 20) == 0
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"Retry-After: " in answer
    assert b"Connection: close" in answer
    assert b"shutdown_timeout" in answer
    assert await count(db) == 0
    events = log_events(config)
    (batch,) = [e for e in events if e["event"] == "batch"]
    assert batch["status"] == 503
    assert not [e for e in events if e["level"] in ("error", "critical")], events


async def test_sigterm_closes_connections_whose_headers_are_unfinished(
    tmp_path: Path, database_url: str
) -> None:
    # a connection still sending its headers holds no request yet: it is closed at once, the
    # receiver does not wait for its header_timeout (30 s here) to stop
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    config.write_text(config.read_text().replace("[server]\n", "[server]\nheader_timeout = 30\n"))
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        unfinished = socket.create_connection(("127.0.0.1", port))
        try:
            unfinished.sendall(b"POST /flespi HTTP/1.1\r\nHost: x\r\nX-Pad: 1\r\n")
            await asyncio.sleep(0.3)
            started = asyncio.get_running_loop().time()
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 20) == 0
            assert asyncio.get_running_loop().time() - started < 10
            assert await receive(unfinished) == b""  # closed, nothing was asked
        finally:
            unfinished.close()
