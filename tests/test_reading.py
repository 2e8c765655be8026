"""A downstream reader following docs/sql.md sees every stored row once, in order, whatever
the batches did meanwhile: slow bodies, small batches, two streams, two receivers.

The reader is the very code of the docs (the Python block of "Reading every message once").
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flespi_receiver.embedded import free_port

from conftest import Client, ClientFactory
from helpers import (
    AUTH,
    append_toml,
    config_file,
    flespi_message,
    receiver_process,
    reply_on,
    send_partial_body,
    streams_toml,
    wait_for_writer,
    wait_until_serving,
)

ROOT = Path(__file__).parent.parent
STREAM_B = '\n[[streams]]\nname = "b"\npath = "/b"\nauthorization = ["Bearer test-token"]\n'
Reader = dict[str, Any]
unique = itertools.count()


def documented_reader() -> Reader:
    """The namespace of the docs' Python reader: read_next, follow, NEXT_MESSAGES."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/sql.md").read_text(), re.DOTALL)
    (code,) = [block for block in blocks if "def read_next" in block]
    namespace: Reader = {}
    exec(compile(code, "docs/sql.md", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def messages(size: int) -> list[dict[str, Any]]:
    """`size` messages no other batch of the test run has."""
    return [flespi_message(next(unique)) for _ in range(size)]


async def drain(
    read: Callable[..., Awaitable[Any]], conn: asyncpg.Connection, position: Any, seen: list[Any]
) -> Any:
    """Read until the reader has caught up with every row the table holds."""
    total = await conn.fetchval("SELECT count(*) FROM flespi.messages")
    waits = 0
    # another session on the server may hold the horizon back a while: only the reads that
    # find nothing count against the patience, however few rows a read takes
    while waits < 600:
        rows, position = await read(conn, position, 50)
        seen.extend(rows)
        if rows:
            continue
        if len(seen) >= total:
            return position
        waits += 1
        await asyncio.sleep(0.05)
    raise AssertionError(f"the reader saw {len(seen)} of {total} rows")


async def assert_each_row_once_in_order(conn: asyncpg.Connection, seen: list[Any]) -> None:
    keys = [(r["xact_id"], r["id"]) for r in seen]
    assert keys == sorted(keys), "rows came out of order"
    assert len(set(keys)) == len(keys), "a row came twice"
    stored = await conn.fetch("SELECT xact_id, id FROM flespi.messages ORDER BY xact_id, id")
    assert keys == [(r["xact_id"], r["id"]) for r in stored], "a row was missed"


async def test_a_slow_batch_is_not_skipped_by_a_reader_that_read_meanwhile(
    tmp_path: Path, database_url: str
) -> None:
    reader = documented_reader()
    read_next = reader["read_next"]
    port_a, port_b = free_port(), free_port()
    first = append_toml(config_file(tmp_path, database_url, port_a, "a"), STREAM_B)
    second = append_toml(config_file(tmp_path, database_url, port_b, "b"), STREAM_B)
    body = orjson.dumps(messages(200))
    conn = await asyncpg.connect(database_url)
    seen: list[Any] = []
    try:
        with receiver_process(first) as a, receiver_process(second) as b:
            await wait_until_serving(port_a, a)
            await wait_until_serving(port_b, b)
            # stream "main" on one receiver: a 200-message body whose sender pauses after 60 KB
            raw = await asyncio.to_thread(send_partial_body, port_a, len(body), body[:60_000])
            await wait_for_writer(conn)
            # meanwhile stream "b" on the other receiver stores 5 messages, committed at once
            async with aiohttp.ClientSession() as session:
                small = orjson.dumps(messages(5))
                url = f"http://127.0.0.1:{port_b}/b"
                async with session.post(url, data=small, headers=AUTH) as reply:
                    assert (await reply.json())["stored"] == 5
            rows, position = await read_next(conn, (0, 0))
            seen.extend(rows)
            raw.sendall(body[60_000:])
            assert b'"stored":200' in await reply_on(raw)
            await drain(read_next, conn, position, seen)
        assert len(seen) == 205
        await assert_each_row_once_in_order(conn, seen)
        slow = await conn.fetchval("SELECT min(xact_id) FROM flespi.messages WHERE stream = 'main'")
        # what was read while the slow batch was open lies wholly before it
        assert all(r["xact_id"] < slow for r in rows)
    finally:
        await conn.close()


async def trickled(body: bytes, pause: float) -> AsyncIterator[bytes]:
    """The body in pieces of 8 KB with a pause between them: a slow sender."""
    for start in range(0, len(body), 8192):
        yield body[start : start + 8192]
        await asyncio.sleep(pause)


async def post(session: Any, url: str, batch: list[dict[str, Any]], pause: float) -> int:
    """Send a batch, slowly when `pause` is set; the number of messages stored."""
    body = orjson.dumps(batch)
    headers = {**AUTH, "Content-Length": str(len(body))}
    data = trickled(body, pause) if pause else body
    async with session.post(url, data=data, headers=headers) as reply:
        assert reply.status == 200, await reply.text()
        stored: int = (await reply.json())["stored"]
        return stored


async def test_the_documented_follower_sees_every_row_once_from_two_receivers(
    tmp_path: Path, database_url: str
) -> None:
    reader = documented_reader()
    ports = [free_port(), free_port()]
    configs = [
        append_toml(config_file(tmp_path, database_url, port, f"r{port}"), STREAM_B)
        for port in ports
    ]
    seen: list[Any] = []
    positions: list[Any] = []

    async def handle(rows: list[Any], position: Any) -> None:
        seen.extend(rows)
        positions.append(position)

    with receiver_process(configs[0]) as a, receiver_process(configs[1]) as b:
        await wait_until_serving(ports[0], a)
        await wait_until_serving(ports[1], b)
        follower = asyncio.create_task(reader["follow"](database_url, (0, 0), handle, poll=0.2))
        jobs = []
        async with aiohttp.ClientSession() as session:
            for n in range(24):
                url = f"http://127.0.0.1:{ports[n % 2]}/{'flespi' if n % 3 else 'b'}"
                slow = n % 6 == 0  # a 250-message body over about a second, stored as it comes
                batch = messages(250 if slow else 1 + n % 20)
                jobs.append(post(session, url, batch, 0.03 if slow else 0))
            stored = sum(await asyncio.gather(*jobs))
        conn = await asyncpg.connect(database_url)
        try:
            assert stored == await conn.fetchval("SELECT count(*) FROM flespi.messages")
            for _ in range(600):
                if len(seen) >= stored:
                    break
                await asyncio.sleep(0.05)
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await assert_each_row_once_in_order(conn, seen)
            assert positions[-1] == (seen[-1]["xact_id"], seen[-1]["id"])
        finally:
            await conn.close()


TWO_STREAMS = streams_toml(
    ("main", "/flespi", "Bearer test-token"), ("b", "/b", "Bearer test-token")
)
batches = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=1),  # which receiver
        st.sampled_from(["/flespi", "/b"]),  # which stream
        st.integers(min_value=1, max_value=260),  # messages (over ~175: stored as it arrives)
        st.sampled_from([0.0, 0.0, 0.01, 0.04]),  # pause between the 8 KB pieces of the body
        st.floats(min_value=0, max_value=0.3),  # when it starts
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=batches, limit=st.integers(min_value=1, max_value=60))
async def test_any_mix_of_batches_is_read_once_in_order(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    plan: list[tuple[int, str, int, float, float]],
    limit: int,
) -> None:
    await db.execute("TRUNCATE messages")
    read_next = documented_reader()["read_next"]
    clients = [await receiver(streams=TWO_STREAMS), await receiver(streams=TWO_STREAMS)]
    conn = db
    seen: list[Any] = []
    writing = True

    async def send(client: Client, path: str, size: int, pause: float, start: float) -> None:
        await asyncio.sleep(start)
        body = orjson.dumps(messages(size))
        headers = {**AUTH, "Content-Length": str(len(body))}
        data = trickled(body, pause) if pause else body
        reply = await client.post(path, data=data, headers=headers)
        assert reply.status == 200

    async def read_meanwhile() -> Any:
        position: Any = (0, 0)
        while writing:
            rows, position = await read_next(conn, position, limit)
            seen.extend(rows)
            await asyncio.sleep(0.01)
        return position

    try:
        reading = asyncio.create_task(read_meanwhile())
        await asyncio.gather(*(send(clients[c], p, n, s, t) for c, p, n, s, t in plan))
        writing = False
        position = await reading
        await drain(lambda c, p, _: read_next(c, p, limit), conn, position, seen)
        await assert_each_row_once_in_order(conn, seen)
    finally:
        for client in clients:
            await client.close()
