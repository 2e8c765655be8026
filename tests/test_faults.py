"""Real faults: the database stops, backends are terminated, the receiver is killed, replicas race.

After each, the table holds every acknowledged message exactly once and the stream goes on.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from flespi_receiver.embedded import EmbeddedPostgres, free_port
from flespi_receiver.emulator import StreamEmulator, encode_messages, sample_messages
from flespi_receiver.state import POOL

from conftest import SCHEMA, ClientFactory
from helpers import (
    AUTH,
    TOKEN,
    config_file,
    count,
    duplicated,
    flespi_message,
    log_events,
    receiver_process,
    reply_on,
    send_partial_body,
    wait_for_lock_wait,
    wait_until_serving,
)

FAST_FAILURE = "[database]\nacquire_timeout = 0.5\ncommand_timeout = 5\n"


async def fresh_connection(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(database_url, server_settings={"search_path": SCHEMA})


async def test_database_stopped_and_restarted_mid_stream(
    receiver: ClientFactory, database_url: str, embedded_server: EmbeddedPostgres
) -> None:
    client = await receiver()
    messages = encode_messages(sample_messages(1200, seed=1))
    emulator = StreamEmulator(
        str(client.make_url("/flespi")), authorization=TOKEN, resend_rate=0.2, retry_delay=0.05
    )
    stream = asyncio.create_task(emulator.run(messages, batch_size=20))
    while emulator.stats.batches < 10:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(embedded_server.stop)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(embedded_server.start)
    stats = await asyncio.wait_for(stream, 120)

    assert stats.statuses.get(503, 0) + stats.connection_errors > 0, "the outage was not seen"
    db = await fresh_connection(database_url)
    try:
        assert await count(db) == len(messages)
        assert await duplicated(db) == 0
    finally:
        await db.close()


async def test_503_carries_retry_after(receiver: ClientFactory, db: asyncpg.Connection) -> None:
    client = await receiver()
    batch = orjson.dumps([flespi_message(i) for i in range(5)])
    async with db.transaction():
        await db.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        pending = asyncio.create_task(client.post("/flespi", data=batch, headers=AUTH))
        pid = await wait_for_lock_wait(db)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)
        reply = await pending
        assert reply.status == 503
        assert reply.headers["Retry-After"].isdigit()
    assert await count(db) == 0
    # the pool replaces the dead connection by itself: the same batch now goes through
    reply = await client.post("/flespi", data=batch, headers=AUTH)
    assert (reply.status, (await reply.json())["stored"]) == (200, 5)


async def test_exhausted_pool_gets_503_after_the_timeout(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(database="pool_size = 1\nacquire_timeout = 0.3")
    first = orjson.dumps([flespi_message(1)])
    second = orjson.dumps([flespi_message(2)])
    async with db.transaction():
        await db.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        holding = asyncio.create_task(client.post("/flespi", data=first, headers=AUTH))
        await wait_for_lock_wait(db)
        waiting = await client.post("/flespi", data=second, headers=AUTH)
        assert waiting.status == 503
        assert "Retry-After" in waiting.headers
    assert (await holding).status == 200
    assert (
        await db.fetchval("SELECT count(*) FROM messages WHERE payload->>'device.id' = '500002'")
        == 0
    )


async def test_receiver_sessions_commit_synchronously_whatever_the_server_default(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    database = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE {database} SET synchronous_commit = off")
    client = await receiver()
    async with client.app[POOL].acquire() as conn:
        assert await conn.fetchval("SHOW synchronous_commit") == "on"


async def test_slow_client_gets_408_and_nothing_is_stored(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(extra="body_timeout = 0.5")
    body = orjson.dumps([flespi_message(1)])
    raw = await asyncio.to_thread(send_partial_body, client.port, len(body), body[:20])
    assert (await reply_on(raw)).startswith(b"HTTP/1.1 408")
    assert await count(db) == 0


async def test_abandoned_request_stores_nothing_and_the_stream_goes_on(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    body = orjson.dumps([flespi_message(i) for i in range(50)])
    raw = await asyncio.to_thread(send_partial_body, client.port, len(body), body[: len(body) // 2])
    raw.close()
    await asyncio.sleep(0.2)
    assert await count(db) == 0
    reply = await client.post("/flespi", data=body, headers=AUTH)
    assert (await reply.json())["stored"] == 50


@pytest.mark.parametrize("messages", [3, 400], ids=["read-whole", "stored-while-arriving"])
async def test_a_client_closing_its_side_mid_body_gets_400_and_nothing_is_kept(
    tmp_path: Path, database_url: str, db: asyncpg.Connection, messages: int
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    body = orjson.dumps([flespi_message(i) for i in range(messages)])
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        raw = await asyncio.to_thread(send_partial_body, port, len(body), body[: len(body) // 2])
        raw.shutdown(socket.SHUT_WR)  # it still reads: it can be told why
        answer = await reply_on(raw)
        assert answer.startswith(b"HTTP/1.1 400"), answer
        assert b"Connection: close" in answer
        assert b"body incomplete" in answer
        assert await count(db) == 0
        # the whole body and then the end of sending: a complete request, answered as usual
        raw = await asyncio.to_thread(send_partial_body, port, len(body), body)
        raw.shutdown(socket.SHUT_WR)
        assert (await reply_on(raw)).startswith(b"HTTP/1.1 200")
        await db.execute("TRUNCATE messages")
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{port}/flespi", data=body, headers=AUTH) as reply,
        ):
            assert (await reply.json())["stored"] == messages  # the resend stores it whole
    (refused,) = [e for e in log_events(config) if e["event"] == "batch" and e["status"] == 400]
    assert refused["stream"] == "main"


@pytest.fixture
def two_receivers(
    tmp_path: Path, database_url: str
) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    ports = [free_port(), free_port()]
    with (
        receiver_process(config_file(tmp_path, database_url, ports[0], "a")) as a,
        receiver_process(config_file(tmp_path, database_url, ports[1], "b")) as b,
    ):
        yield [(ports[0], a), (ports[1], b)]


async def test_killed_receiver_loses_and_doubles_nothing(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    messages = encode_messages(sample_messages(300, seed=2))
    emulator = StreamEmulator(f"http://127.0.0.1:{port}/flespi", authorization=TOKEN)
    with receiver_process(config) as first:
        await wait_until_serving(port, first)
        async with db.transaction():
            await db.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            stream = asyncio.create_task(emulator.run(messages, batch_size=100))
            await wait_for_lock_wait(db)
            first.send_signal(signal.SIGKILL)  # in the middle of the first batch
            first.wait()
    with receiver_process(config) as second:
        stats = await asyncio.wait_for(stream, 60)
        assert second.poll() is None
    assert stats.connection_errors >= 1
    assert await count(db) == 300
    assert await duplicated(db) == 0


async def test_two_receivers_fed_overlapping_batches_store_each_message_once(
    two_receivers: list[tuple[int, subprocess.Popen[bytes]]], db: asyncpg.Connection
) -> None:
    for port, process in two_receivers:
        await wait_until_serving(port, process)
    messages = encode_messages(sample_messages(1000, seed=3))
    a, b = (f"http://127.0.0.1:{port}/flespi" for port, _ in two_receivers)
    streams = [
        StreamEmulator(a, authorization=TOKEN, resend_rate=0.3, seed=1).run(messages[:600], 40),
        StreamEmulator(b, authorization=TOKEN, resend_rate=0.3, seed=2).run(messages[300:], 70),
        StreamEmulator(b, authorization=TOKEN, seed=3).run(messages[::-1], 90),
    ]
    results = await asyncio.gather(*streams)
    # the very same batch to both replicas at the same moment, as a proxy retrying might do
    same = b"[" + b",".join(messages[:100]) + b"]"
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(
            *(session.post(url, data=same, headers=AUTH) for url in (a, b, a, b))
        )
        bodies = [await r.json() for r in replies]
    assert [r.status for r in replies] == [200] * 4
    assert sum(body["stored"] for body in bodies) == 0
    assert all(s.non_200 == 0 for s in results), [s.statuses for s in results]
    assert await count(db) == 1000
    assert await duplicated(db) == 0
