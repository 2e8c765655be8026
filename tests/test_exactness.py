"""What is stored is what was sent: identifiers of any size, whatever the JSON spelling."""

from __future__ import annotations

import json

import asyncpg
import orjson
import pytest

from flespi_receiver.store import SMALL_BATCH

from conftest import ClientFactory
from helpers import AUTH, flespi_message

BIG_IDENTS = [
    18446744073709551615,  # the largest that fits 64 bits unsigned
    18446744073709551616,
    -9223372036854775809,
    123456789012345678901234567890123456789012345678901234567890,
]


@pytest.mark.parametrize("size", [1, SMALL_BATCH + 1], ids=["insert", "copy"])
async def test_an_integer_ident_of_any_size_is_kept_as_its_digits(
    receiver: ClientFactory, db: asyncpg.Connection, size: int
) -> None:
    client = await receiver()
    batch = [flespi_message(i) for i in range(size - 1)]
    batch += [{"ident": ident, "timestamp": 1764000000 + n} for n, ident in enumerate(BIG_IDENTS)]
    # the standard library writes integers of any size; orjson stops at 64 bits
    reply = await client.post("/flespi", data=json.dumps(batch).encode(), headers=AUTH)
    assert await reply.json() == {"stored": len(batch), "duplicates": 0, "rejected": 0}
    idents = await db.fetch("SELECT ident FROM messages ORDER BY id")
    assert [row["ident"] for row in idents][-len(BIG_IDENTS) :] == [str(i) for i in BIG_IDENTS]


async def test_a_float_ident_has_no_text_form(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    body = b'[{"ident": 1.8446744073709552e19}, {"ident": 1e300}, {"ident": 12.0}]'
    reply = await client.post("/flespi", data=body, headers=AUTH)
    assert (await reply.json())["stored"] == 3
    assert await db.fetch("SELECT ident FROM messages") == [(None,), (None,), (None,)]
    single = orjson.dumps([{"ident": 5}])
    await client.post("/flespi", data=single, headers=AUTH)
    assert await db.fetchval("SELECT ident FROM messages WHERE ident IS NOT NULL") == "5"
