"""Every JSON spelling of a batch is stored as its compact form is, and keeps its own identity."""

from __future__ import annotations

import asyncpg
import pytest

from flespi_receiver.emulator import sample_messages
from flespi_receiver.identity import text_identity
from flespi_receiver.spellings import SPELLINGS, spelled
from flespi_receiver.store import SMALL_BATCH

from conftest import ClientFactory
from helpers import AUTH, flespi_message, streams_toml

STREAMS = streams_toml(*((s, f"/{s}", "Bearer test-token") for s in SPELLINGS))
# batches taking each way in: one INSERT, one COPY of a body read whole, a body stored as it
# arrives (larger than what is read whole, about 64 KB)
SIZES = {"insert": SMALL_BATCH, "copy": SMALL_BATCH + 1, "streamed": 120}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
async def test_every_spelling_stores_the_compact_payload_under_the_hash_of_its_own_text(
    receiver: ClientFactory, db: asyncpg.Connection, size: int
) -> None:
    client = await receiver(streams=STREAMS)
    messages = sample_messages(size, seed=7, devices=size)
    texts = {s: [spelled(m, s) for m in messages] for s in SPELLINGS}
    bodies = {s: b"[" + b",".join(t) + b"]" for s, t in texts.items()}
    for spelling, body in bodies.items():
        reply = await client.post(f"/{spelling}", data=body, headers=AUTH)
        assert await reply.json() == {"stored": size, "duplicates": 0, "rejected": 0}, spelling
    compact = await db.fetch(
        "SELECT payload, ident, ts FROM messages WHERE stream = 'compact' ORDER BY id"
    )
    for spelling in SPELLINGS:
        rows = await db.fetch(
            "SELECT payload, ident, ts, message_hash FROM messages WHERE stream = $1 ORDER BY id",
            spelling,
        )
        assert [r[1:3] for r in rows] == [r[1:] for r in compact], spelling
        assert [r["message_hash"] for r in rows] == [text_identity(t) for t in texts[spelling]]
        # jsonb as PostgreSQL reads the text: whitespace and escapes gone, numbers as sent
        assert await db.fetchval(SAME_PAYLOADS, spelling) == size, spelling
        if spelling != "numbers":
            assert [r["payload"] for r in rows] == [r["payload"] for r in compact], spelling
    # a number keeps its spelling (jsonb's numeric keeps the digits it was given)
    assert (
        await db.fetchval(
            "SELECT payload->'position.latitude' FROM messages WHERE stream = 'numbers' LIMIT 1"
        )
        == spelled(messages[0], "numbers").split(b'"position.latitude":')[1].split(b",")[0].decode()
    )
    # the same bytes again are the same messages, in every spelling
    for spelling, body in bodies.items():
        reply = await client.post(f"/{spelling}", data=body, headers=AUTH)
        assert await reply.json() == {"stored": 0, "duplicates": size, "rejected": 0}, spelling
    assert await db.fetchval("SELECT count(*) FROM messages") == size * len(SPELLINGS)


# rows of a spelling whose payload equals (as jsonb) that of the same message sent compact
SAME_PAYLOADS = """
SELECT count(*) FROM
  (SELECT payload, row_number() OVER (ORDER BY id) n FROM messages WHERE stream = 'compact') c
JOIN (SELECT payload, row_number() OVER (ORDER BY id) n FROM messages WHERE stream = $1) s
  USING (n)
WHERE c.payload = s.payload
"""


# keys that appear twice, however the text spells them: (element, the key named)
HIDDEN_DUPLICATES = [
    # whitespace between a key and its colon
    (b'{"ident":"x","a" :1,"a":2}', "a"),
    (b'{"ident":"x",\n "a"\t:\n1,\n "a": 2}', "a"),
    # the earlier value's colons gone with it
    (b'{"ident":"x","a":"12:30","a":"12:31"}', "a"),
    # a colon escaped in the value that survives balances the lost key's colon
    (b'{"ident":"x","a":1,"a":"\\u003a"}', "a"),
    (b'{"ident":"x","a":1,"a":"\\u003A"}', "a"),
    # a key spelled with an escape, in a nested object
    (b'{"ident":"x","n":{"b":1,"\\u0062":[{"c":":"}]}}', "b"),
    # a colon in a key
    (b'{"ident":"x",":":1,"\\u003a":2}', ":"),
]


@pytest.mark.parametrize("size", [1, SMALL_BATCH + 1], ids=["insert", "copy"])
async def test_a_duplicate_key_hidden_by_its_spelling_is_quarantined(
    receiver: ClientFactory, db: asyncpg.Connection, size: int
) -> None:
    client = await receiver()
    ordinary = [spelled(flespi_message(i), "spaced") for i in range(size)]
    body = b"[" + b",".join(ordinary + [e for e, _ in HIDDEN_DUPLICATES]) + b"]"
    reply = await client.post("/flespi", data=body, headers=AUTH)
    assert await reply.json() == {
        "stored": size,
        "duplicates": 0,
        "rejected": len(HIDDEN_DUPLICATES),
    }
    rejected = await db.fetch("SELECT raw, reason FROM rejected_messages ORDER BY id")
    assert [(r["raw"], r["reason"]) for r in rejected] == [
        (element, f"duplicate key {key!r}") for element, key in HIDDEN_DUPLICATES
    ]
