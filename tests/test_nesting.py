"""Deep nesting is content, never a server error: stored up to 1024 levels, quarantined beyond.

Every library on the way has a nesting limit of its own (orjson writes 254 levels and reads
1024, msgspec and the standard library stop at Python's recursion limit, PostgreSQL's jsonb at
its stack depth), so depths are drawn around each of them, alone and among ordinary messages,
on each write path: one INSERT (small batch), COPY (larger batch) and a body stored while it
arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flespi_receiver.ingest import STREAMED_BODY
from flespi_receiver.json_scan import MAX_DEPTH
from flespi_receiver.store import SMALL_BATCH

from conftest import Client, ClientFactory
from helpers import AUTH, count, flespi_message

# around orjson's writer (254), Python's recursion (~450 for a two-frame recursion, ~1000),
# orjson's reader and the documented limit (1024), and far beyond
DEPTHS = [1, 2, 199, 201, 253, 254, 255, 256, 449, 451, 989, 991, 999, 1001, 1022, 1023]
DEPTHS += [MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 2, 2000, 50_000]


def nested(depth: int, shape: str) -> bytes:
    """A message whose nesting is `depth` levels, the message object being the first."""
    inner = depth - 1
    if shape == "arrays":
        return b'{"n":' + b"[" * inner + b"]" * inner + b"}" if inner else b'{"n":1}'
    if shape == "objects":
        return b'{"n":' * depth + b"1" + b"}" * depth
    # arrays and objects in turn, with whitespace between the tokens
    opened = b"".join(b" [" if level % 2 == 0 else b' {"x" :' for level in range(inner))
    closed = b"".join(b"] " if level % 2 == 0 else b"} " for level in reversed(range(inner)))
    return b'{ "n" : ' + (opened + b" 7 " + closed if inner else b"1") + b" }"


def depth_of(element: bytes) -> int:
    """The nesting of a generated element, measured by counting, not by a parser."""
    depth = deepest = 0
    for byte in element:
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def test_the_generated_depths_are_what_they_say() -> None:
    for shape in ("arrays", "objects", "mixed"):
        for depth in (1, 2, 3, 254, 1024, 1025):
            assert depth_of(nested(depth, shape)) == depth


async def trickle(body: bytes, piece: int = 16384) -> AsyncIterator[bytes]:
    for start in range(0, len(body), piece):
        yield body[start : start + piece]
        await asyncio.sleep(0)


async def post(client: Client, body: bytes, streamed: bool) -> tuple[int, Any]:
    headers = {**AUTH, "Content-Length": str(len(body))}
    reply = await client.post("/flespi", data=trickle(body) if streamed else body, headers=headers)
    return reply.status, await reply.json(content_type=None)


# how many ordinary messages go with the deep ones on each path
ORDINARY = {"insert": 3, "copy": SMALL_BATCH + 5, "streamed": 250}


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(sorted(ORDINARY)),
    deep=st.lists(
        st.tuples(st.sampled_from(DEPTHS), st.sampled_from(["arrays", "objects", "mixed"])),
        min_size=1,
        max_size=4,
    ),
    order=st.randoms(use_true_random=False),
)
async def test_any_depth_is_stored_or_quarantined_on_every_path(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    path: str,
    deep: list[tuple[int, str]],
    order: Any,
) -> None:
    await db.execute("TRUNCATE messages, rejected_messages")
    # one level deep, both shapes spell the same message: keep each text once
    elements = list(dict.fromkeys(nested(depth, shape) for depth, shape in deep))
    ordinary = [orjson.dumps(flespi_message(i)) for i in range(ORDINARY[path])]
    batch = elements + ordinary
    order.shuffle(batch)
    body = b"[" + b",".join(batch) + b"]"
    streamed = path == "streamed"
    assume((len(body) > STREAMED_BODY) == streamed)
    too_deep = [e for e in elements if depth_of(e) > MAX_DEPTH]
    kept = len(batch) - len(too_deep)
    client = await receiver()
    try:
        status, reply = await post(client, body, streamed)
        assert (status, reply) == (
            200,
            {"stored": kept, "duplicates": 0, "rejected": len(too_deep)},
        )
        stored = await db.fetch("SELECT payload::text FROM messages ORDER BY id")
        # in the order sent, every level intact
        assert [orjson.loads(row[0]) for row in stored] == [
            orjson.loads(e) for e in batch if e not in too_deep
        ]
        quarantined = await db.fetch("SELECT raw, reason FROM rejected_messages ORDER BY raw")
        assert sorted(r["raw"] for r in quarantined) == sorted(too_deep)
        assert {r["reason"] for r in quarantined} <= {f"nesting deeper than {MAX_DEPTH} levels"}
        # the same batch again: nothing new in either table
        status, reply = await post(client, body, streamed)
        assert (status, reply) == (
            200,
            {"stored": 0, "duplicates": kept, "rejected": len(too_deep)},
        )
        assert await count(db) == kept
    finally:
        await client.close()


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1])
async def test_the_documented_limit_is_the_real_one(
    receiver: ClientFactory, db: asyncpg.Connection, depth: int
) -> None:
    client = await receiver()
    element = nested(depth, "objects")
    status, reply = await post(client, b"[" + element + b"]", streamed=False)
    assert status == 200
    if depth <= MAX_DEPTH:
        assert reply == {"stored": 1, "duplicates": 0, "rejected": 0}
        # PostgreSQL holds every level: the innermost value is where it was sent
        innermost = await db.fetchval("SELECT payload #> $1 FROM messages", ["n"] * depth)
        assert innermost == "1"
    else:
        assert reply == {"stored": 0, "duplicates": 0, "rejected": 1}
        assert await db.fetchval("SELECT reason FROM rejected_messages") == (
            "nesting deeper than 1024 levels"
        )
