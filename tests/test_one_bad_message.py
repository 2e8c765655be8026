"""One message that must be quarantined costs only itself: the rest of its batch is stored by
the same fast path as a batch without it (one INSERT, one COPY, COPY while the body arrives),
the bad one kept in rejected_messages in the same transaction."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from structlog.testing import capture_logs

from flespi_receiver.ingest import STREAMED_BODY
from flespi_receiver.store import SMALL_BATCH

from conftest import Client, ClientFactory
from helpers import AUTH, REJECT_STREAM, count, flespi_message

# how each fast path is reached: how many good messages, and how the body is sent
TRANSPORTS = {
    "insert": (10, "whole"),  # fewer than SMALL_BATCH: one INSERT statement
    "copy": (80, "whole"),  # more, in a body smaller than STREAMED_BODY: one COPY
    "streamed": (300, "trickled"),  # larger than STREAMED_BODY: COPY while it arrives
    "chunked-gzip": (300, "chunked-gzip"),  # no length known, decoded size over STREAMED_BODY
}
PATHS = {"insert": "insert", "copy": "copy", "streamed": "streamed", "chunked-gzip": "streamed"}
# a bad element of each kind the fast split lets through, and the reason it is kept with
BAD = {
    "duplicate-key": (b'{"ident": "1", "ident": "2"}', "duplicate key 'ident'"),
    "invalid-utf8": (
        b'{"ident": "\xff"}',
        "not valid UTF-8: byte 0xff at offset 11 of the message",
    ),
    "nul": (
        b'{"ident": "a\\u0000"}',
        "a string or key contains \\u0000, which PostgreSQL cannot store",
    ),
    "not-an-object": (b"[1, 2]", "not a JSON object but an array"),
    "number": (b"5", "not a JSON object but a number"),
    "beyond-a-double": (
        b'{"position.speed": 1e400}',
        "not valid JSON: number is infinity when parsed as double: line 1 column 20 (char 19)",
    ),
}


def good_messages(size: int, start: int = 0) -> list[bytes]:
    return [orjson.dumps(flespi_message(i)) for i in range(start, start + size)]


def with_bad(good: list[bytes], bad: bytes, position: str) -> bytes:
    at = {"first": 0, "middle": len(good) // 2, "last": len(good)}[position]
    return b"[" + b",".join([*good[:at], bad, *good[at:]]) + b"]"


async def pieces(data: bytes, piece: int = 7000) -> AsyncIterator[bytes]:
    """The body in small writes with pauses: the receiver gets it in many chunks."""
    for start in range(0, len(data), piece):
        yield data[start : start + piece]
        await asyncio.sleep(0.001)


async def send(
    client: Client, body: bytes, how: str, path: str = "/flespi"
) -> tuple[int, Any, str | None]:
    """Status, JSON reply, and the `path` of the batch's log line."""
    headers = dict(AUTH)
    data: bytes | AsyncIterator[bytes] = body
    if how == "whole":
        assert len(body) <= STREAMED_BODY
    else:
        assert len(body) > STREAMED_BODY
    if how == "trickled":
        headers["Content-Length"] = str(len(body))
        data = pieces(body)
    elif how == "chunked-gzip":
        headers["Content-Encoding"] = "gzip"
        data = pieces(gzip.compress(body), 2000)  # no length: sent chunked
    with capture_logs() as logs:
        reply = await client.post(path, data=data, headers=headers)
        answer = await reply.json()
    (line,) = [e for e in logs if e["event"] == "batch"]
    return reply.status, answer, line.get("path")


async def listen(database_url: str) -> tuple[asyncpg.Connection, asyncio.Queue[Any]]:
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[Any] = asyncio.Queue()
    await listener.add_listener(
        "flespi_messages", lambda *args: received.put_nowait(orjson.loads(args[3]))
    )
    return listener, received


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("transport", list(TRANSPORTS))
async def test_one_bad_message_costs_only_itself(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
    transport: str,
    position: str,
) -> None:
    client = await receiver()
    size, how = TRANSPORTS[transport]
    good = good_messages(size)
    bad, reason = BAD["duplicate-key"]
    body = with_bad(good, bad, position)
    listener, notes = await listen(database_url)
    try:
        status, reply, path = await send(client, body, how)
        assert (status, reply) == (200, {"stored": size, "duplicates": 0, "rejected": 1})
        # the fast path stored it, as it would have without the bad message
        assert path == PATHS[transport]
        rows = await db.fetch("SELECT id, payload::text AS p FROM messages ORDER BY id")
        assert [orjson.loads(r["p"]) for r in rows] == [orjson.loads(g) for g in good]
        quarantined = await db.fetch("SELECT raw, reason FROM rejected_messages")
        assert [tuple(r) for r in quarantined] == [(bad, reason)]
        note = await asyncio.wait_for(notes.get(), 5)
        assert (note["count"], note["first_id"], note["last_id"]) == (
            size,
            rows[0]["id"],
            rows[-1]["id"],
        )
        # device_state folds only what was stored: the bad message's ident is not there
        idents = {r[0] for r in await db.fetch("SELECT ident FROM device_state")}
        assert idents == {flespi_message(i)["ident"] for i in range(size)}

        # flespi sends the batch again (its reply was lost): nothing is stored twice
        status, reply, path = await send(client, body, how)
        assert (status, reply) == (200, {"stored": 0, "duplicates": size, "rejected": 1})
        assert await count(db) == size
        assert await count(db, "rejected_messages") == 1
        await asyncio.sleep(0.1)
        assert notes.empty()  # nothing stored, nothing notified
    finally:
        await listener.close()


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("transport", ["insert", "copy"])
async def test_each_kind_of_bad_message_is_kept_beside_its_batch(
    receiver: ClientFactory, db: asyncpg.Connection, transport: str, kind: str
) -> None:
    client = await receiver()
    size, how = TRANSPORTS[transport]
    bad, reason = BAD[kind]
    status, reply, path = await send(client, with_bad(good_messages(size), bad, "middle"), how)
    assert (status, reply, path) == (
        200,
        {"stored": size, "duplicates": 0, "rejected": 1},
        transport,
    )
    assert tuple(await db.fetchrow("SELECT raw, reason FROM rejected_messages")) == (bad, reason)
    assert await count(db) == size


@pytest.mark.parametrize("transport", list(TRANSPORTS))
async def test_a_stream_refusing_bad_content_still_refuses_the_batch(
    receiver: ClientFactory, db: asyncpg.Connection, transport: str
) -> None:
    client = await receiver(streams=REJECT_STREAM)
    size, how = TRANSPORTS[transport]
    bad, reason = BAD["invalid-utf8"]
    status, reply, path = await send(client, with_bad(good_messages(size), bad, "middle"), how)
    assert (status, reply, path) == (422, {"error": reason}, None)
    assert await count(db) == 0
    assert await count(db, "rejected_messages") == 0


@pytest.mark.parametrize("transport", ["insert", "copy", "streamed"])
async def test_bad_content_sent_before_is_kept_once_and_counted_again(
    receiver: ClientFactory, db: asyncpg.Connection, transport: str
) -> None:
    client = await receiver()
    size, how = TRANSPORTS[transport]
    bad, _ = BAD["nul"]
    # the same bad element twice in a batch, and again in the next batch of new messages
    first = with_bad([*good_messages(size), bad], bad, "first")
    status, reply, path = await send(client, first, how)
    assert (status, reply, path) == (
        200,
        {"stored": size, "duplicates": 0, "rejected": 2},
        PATHS[transport],
    )
    second = with_bad(good_messages(size, start=size), bad, "last")
    status, reply, path = await send(client, second, how)
    assert (status, reply, path) == (
        200,
        {"stored": size, "duplicates": 0, "rejected": 1},
        PATHS[transport],
    )
    assert await count(db) == 2 * size
    assert await db.fetchval("SELECT array_agg(raw) FROM rejected_messages") == [bad]


@pytest.mark.parametrize("transport", ["copy", "streamed", "chunked-gzip"])
async def test_copies_of_a_message_within_a_batch_cost_only_themselves(
    receiver: ClientFactory, db: asyncpg.Connection, transport: str
) -> None:
    client = await receiver()
    size, how = TRANSPORTS[transport]
    good = good_messages(size)
    bad, _ = BAD["number"]
    # the same message twice beside a bad one: one kept, the copy counted as a duplicate, and
    # the batch stays on the fast path
    status, reply, path = await send(client, with_bad([*good, good[3]], bad, "middle"), how)
    assert (status, reply, path) == (
        200,
        {"stored": size, "duplicates": 1, "rejected": 1},
        PATHS[transport],
    )
    assert await count(db) == size
    assert await count(db, "rejected_messages") == 1
    # sent again: every message is a duplicate now, nothing stored twice
    status, reply, _ = await send(client, with_bad([*good, good[3]], bad, "middle"), how)
    assert (status, reply) == (200, {"stored": 0, "duplicates": size + 1, "rejected": 1})
    assert await count(db) == size


def test_the_transports_reach_the_paths_they_are_named_after() -> None:
    assert TRANSPORTS["insert"][0] < SMALL_BATCH < TRANSPORTS["copy"][0]


@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize(
    "bad", [b'{"ident":"s","a":"\\ud83d"}', b'{"ident":"n","a":NaN}'], ids=["surrogate", "NaN"]
)
async def test_an_element_msgspec_can_not_read_costs_only_itself(
    receiver: ClientFactory, db: asyncpg.Connection, transport: str, bad: bytes
) -> None:
    client = await receiver()
    size, how = TRANSPORTS[transport]
    status, reply, path = await send(client, with_bad(good_messages(size), bad, "first"), how)
    assert (status, reply, path) == (
        200,
        {"stored": size, "duplicates": 0, "rejected": 1},
        PATHS[transport],
    )
    assert await count(db) == size
    assert await db.fetchval("SELECT raw FROM rejected_messages") == bad
