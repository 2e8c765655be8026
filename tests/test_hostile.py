"""Bad content never stalls a stream: good messages are stored, bad ones quarantined verbatim."""

from __future__ import annotations

import gzip
import io
import json
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flespi_receiver.messages import MAX_REJECTED_ELEMENTS

from conftest import Client, ClientFactory
from helpers import AUTH, REJECT_STREAM, count, flespi_message

GOOD = orjson.dumps(flespi_message(1))

# (bad element as sent, words the quarantine reason must contain)
BAD_ELEMENTS = [
    (b"42", "not a JSON object but a number"),
    (b'"text"', "not a JSON object but a string"),
    (b"null", "not a JSON object but null"),
    (b"[1, 2]", "not a JSON object but an array"),
    (b'{"ident": "1", "ident": "2"}', "duplicate key 'ident'"),
    (b'{"a": {"b": 1, "b": 2}}', "duplicate key 'b'"),
    (b'{"name": "nul\\u0000byte"}', "\\u0000"),
    (b'{"nul\\u0000key": 1}', "\\u0000"),
    (b'{"a": "\\ud800"}', "not valid JSON"),
    (b'{"a": NaN}', "not valid JSON"),
    (b'{"a": Infinity}', "not valid JSON"),
    (b'{"a": 1e400}', "not valid JSON"),
    (b'{"a": "\xff\xfe"}', "not valid UTF-8: byte 0xff at offset 7 of the message"),
    (b'{"a": 1, "b": "caf\xc3"}', "not valid UTF-8: byte 0xc3 at offset 18 of the message"),
    (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nesting deeper than 1024 levels"),
    (b"{'single': 'quotes'}", "not valid JSON"),
    (b'{"a": 1,}', "not valid JSON"),
]


async def post(client: Client, body: bytes) -> tuple[int, Any]:
    reply = await client.post("/flespi", data=body, headers=AUTH)
    return reply.status, await reply.json()


@pytest.mark.parametrize(("element", "reason"), BAD_ELEMENTS, ids=[r for _, r in BAD_ELEMENTS])
async def test_bad_message_is_quarantined_and_the_rest_stored(
    receiver: ClientFactory, db: asyncpg.Connection, element: bytes, reason: str
) -> None:
    client = await receiver()
    other = orjson.dumps(flespi_message(2))
    body = b"[" + GOOD + b", " + element + b" ,\n" + other + b"]"
    assert await post(client, body) == (200, {"stored": 2, "duplicates": 0, "rejected": 1})
    assert await count(db) == 2
    quarantined = await db.fetch("SELECT stream, raw, reason FROM rejected_messages")
    assert [(r["stream"], r["raw"]) for r in quarantined] == [("main", element)]
    assert reason in quarantined[0]["reason"]
    # sending the same batch again stores nothing twice, in either table
    assert await post(client, body) == (200, {"stored": 0, "duplicates": 2, "rejected": 1})
    assert await count(db) == 2
    assert await count(db, "rejected_messages") == 1
    # and the stream goes on
    next_batch = orjson.dumps([flespi_message(3)])
    assert await post(client, next_batch) == (200, {"stored": 1, "duplicates": 0, "rejected": 0})


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"hello", "not a JSON array"),
        (b'{"ident": "1"}', "not a JSON array"),
        (b"", "body is empty"),
        (b'[{"ident": "1"}, {"ident": ', "not valid JSON"),
        (b'[{"ident": "1"}] trailing', "content after the closing ]"),
        (b'[{"ident": "1"}, "unterminated]', "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
    ],
    ids=["not-json", "object", "empty", "truncated", "trailing", "unterminated", "deep-open"],
)
async def test_body_that_is_not_an_array_is_quarantined_whole(
    receiver: ClientFactory, db: asyncpg.Connection, body: bytes, reason: str
) -> None:
    client = await receiver()
    assert await post(client, body) == (200, {"stored": 0, "duplicates": 0, "rejected": 1})
    quarantined = await db.fetchrow("SELECT raw, reason FROM rejected_messages")
    assert quarantined["raw"] == body
    assert reason in quarantined["reason"]
    assert await count(db) == 0


async def test_odd_values_in_known_fields_become_null_but_stay_in_payload(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    odd = [
        {"ident": {"nested": 1}, "timestamp": "yesterday", "position.latitude": "north"},
        {"ident": 12345, "timestamp": 1e12, "device.id": 1.5, "channel.id": 1e30},
        {"timestamp": -1e15, "position.latitude": 91.0, "position.longitude": -181},
        {"ident": True, "device.id": 123456789012345678901234567890, "server.timestamp": None},
        # just past 64 bits: read as a float that rounds to -2**63, which would fit
        {"channel.id": -9223372036854775809, "device.id": -(2**63) - 300},
        # longer than an index entry may be: NULL, not a refusal
        {"ident": "Щ" * 8000},
        {},
        {"": 1, "ключ": "значение", "ctrl": "\u0001\u001f", "big": "x" * 100_000},
    ]
    # the standard library, unlike orjson, writes integers wider than 64 bits
    status, reply = await post(client, json.dumps(odd, ensure_ascii=False).encode())
    assert (status, reply) == (200, {"stored": 8, "duplicates": 0, "rejected": 0})
    stored = await db.fetch(
        "SELECT ident, ts, server_ts, channel_id, device_id, latitude, longitude, payload "
        "FROM messages ORDER BY id"
    )
    assert all(
        row[column] is None
        for row in stored
        for column in ("ts", "server_ts", "channel_id", "device_id", "latitude", "longitude")
    )
    assert [row["ident"] for row in stored] == [None, "12345", None, None, None, None, None, None]
    assert orjson.loads(stored[7]["payload"]) == odd[7]
    # a big integer is kept exactly, not rounded through a float
    exact = await db.fetchval(
        "SELECT payload->>'device.id' FROM messages WHERE ident IS NULL AND payload ? 'device.id'"
        " ORDER BY id LIMIT 1"
    )
    assert exact == "123456789012345678901234567890"


async def test_a_value_postgresql_refuses_is_quarantined(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # a rule of the user's own on the table: PostgreSQL refuses that one message for real
    await db.execute(
        "ALTER TABLE messages ADD CONSTRAINT no_test_devices CHECK (ident <> 'forbidden')"
    )
    client = await receiver()
    body = orjson.dumps([flespi_message(1), {"ident": "forbidden"}, flespi_message(2)])
    assert await post(client, body) == (200, {"stored": 2, "duplicates": 0, "rejected": 1})
    reason = await db.fetchval("SELECT reason FROM rejected_messages")
    assert "no_test_devices" in reason


async def test_reject_mode_refuses_bad_batches_whole(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(streams=REJECT_STREAM)
    status, reply = await post(client, b"[" + GOOD + b', {"a": 1, "a": 2}]')
    assert status == 422
    assert "duplicate key" in reply["error"]
    status, reply = await post(client, b'{"not": "an array"}')
    assert (status, reply["error"]) == (400, "body is not a JSON array")
    await db.execute("ALTER TABLE messages ADD CONSTRAINT no_x CHECK (ident <> 'forbidden')")
    status, reply = await post(client, orjson.dumps([flespi_message(1), {"ident": "forbidden"}]))
    assert status == 422
    assert "no_x" in reply["error"]
    assert await count(db) == 0
    assert await count(db, "rejected_messages") == 0
    assert await post(client, GOOD.join([b"[", b"]"])) == (
        200,
        {"stored": 1, "duplicates": 0, "rejected": 0},
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can write
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
elements = json_values | st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(elements, max_size=8))
async def test_any_json_array_is_stored_or_quarantined_exactly_once(
    receiver: ClientFactory, db: asyncpg.Connection, batch: list[object]
) -> None:
    await db.execute("TRUNCATE messages, rejected_messages")
    client = await receiver()
    try:
        await check_stored_or_quarantined_once(client, db, batch)
    finally:
        await client.close()  # one receiver per example, closed so connections don't pile up


async def check_stored_or_quarantined_once(
    client: Client, db: asyncpg.Connection, batch: list[object]
) -> None:
    body = orjson.dumps(batch)
    status, reply = await post(client, body)
    assert status == 200
    assert reply["stored"] + reply["duplicates"] + reply["rejected"] == len(batch)
    # every distinct element is in exactly one of the two tables, once
    distinct = {orjson.dumps(item) for item in batch}
    assert reply["stored"] == await count(db)
    assert await count(db) + await count(db, "rejected_messages") == len(distinct)
    # the same batch again: nothing new anywhere, and a valid batch after it still works
    status, again = await post(client, body)
    assert again["stored"] == 0
    assert await count(db) == reply["stored"]
    assert (await post(client, orjson.dumps([flespi_message(7)])))[0] == 200


@pytest.mark.parametrize(("element", "reason"), BAD_ELEMENTS, ids=[r for _, r in BAD_ELEMENTS])
async def test_bad_message_in_a_large_batch(
    receiver: ClientFactory, db: asyncpg.Connection, element: bytes, reason: str
) -> None:
    # large batches take the streaming COPY path first; a bad element must divert them whole
    client = await receiver()
    good = [orjson.dumps(flespi_message(i)) for i in range(120)]
    body = b"[" + b",".join([*good[:70], element, *good[70:]]) + b"]"
    assert await post(client, body) == (200, {"stored": 120, "duplicates": 0, "rejected": 1})
    assert reason in await db.fetchval("SELECT reason FROM rejected_messages")
    assert await count(db) == 120


@pytest.mark.parametrize("coding", ["identity", "gzip"])
async def test_a_flood_of_refused_elements_is_kept_whole_as_one_row(
    receiver: ClientFactory, db: asyncpg.Connection, coding: str
) -> None:
    client = await receiver()
    # up to MAX_REJECTED_ELEMENTS refused elements are kept one by one, the rest stored
    limit = MAX_REJECTED_ELEMENTS
    status, reply = await post(client, b"[" + b",".join([b"0"] * limit + [GOOD]) + b"]")
    assert (status, reply) == (200, {"stored": 1, "duplicates": 0, "rejected": limit})
    assert await count(db, "rejected_messages") == 1  # the same text is kept once
    # one more, whatever the body's size: the body is one row, nothing in it stored
    flood = b"[" + b",".join([b"1"] * 300_000 + [orjson.dumps(flespi_message(2))]) + b"]"
    headers = {**AUTH, "Content-Encoding": "gzip"} if coding == "gzip" else AUTH
    sent = gzip.compress(flood) if coding == "gzip" else flood
    reply = await client.post("/flespi", data=io.BytesIO(sent), headers=headers)
    assert (reply.status, await reply.json()) == (
        200,
        {"stored": 0, "duplicates": 0, "rejected": 1},
    )
    raw, reason = await db.fetchrow("SELECT raw, reason FROM rejected_messages ORDER BY id DESC")
    assert raw == flood
    assert reason.startswith(f"body has more than {limit} elements that are not storable")
    assert "not a JSON object but a number" in reason
    assert await count(db) == 1
    # a stream that refuses bad content answers as for any bad message: 422, nothing kept
    client = await receiver(streams=REJECT_STREAM)
    status, reply = await post(client, flood)
    assert (status, reply["error"]) == (422, "not a JSON object but a number")


async def test_copies_of_one_message_in_a_batch_cost_one_message(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # 200 000 copies of {} and one bad element: the careful path keeps one object per text
    client = await receiver()
    flood = b"[" + b",".join([b"{}"] * 200_000 + [b"1"]) + b"]"
    reply = await client.post(
        "/flespi",
        data=io.BytesIO(gzip.compress(flood)),
        headers={**AUTH, "Content-Encoding": "gzip"},
    )
    assert await reply.json() == {"stored": 1, "duplicates": 199_999, "rejected": 1}
    assert await count(db) == 1
