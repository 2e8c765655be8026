"""What is stored is what was sent: identifiers of any size, whatever the JSON spelling."""

from __future__ import annotations

import json
import random
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from flespi_receiver.config import masked_view
from flespi_receiver.store import SMALL_BATCH

from conftest import ClientFactory, SettingsFactory
from helpers import AUTH, flespi_message, streams_toml
from spelling import RandomSpelling

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


async def test_an_integer_ident_past_a_double_is_quarantined_like_every_such_number(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    kept, beyond = 10**307, 10**309  # 1.8e308 is the largest double
    body = f'[{{"ident":{kept}}},{{"ident":{beyond}}}]'.encode()
    reply = await client.post("/flespi", data=body, headers=AUTH)
    assert await reply.json() == {"stored": 1, "duplicates": 0, "rejected": 1}
    assert await db.fetchval("SELECT ident FROM messages") == str(kept)
    assert (
        await db.fetchval("SELECT raw FROM rejected_messages") == f'{{"ident":{beyond}}}'.encode()
    )


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


SPELLING_STREAMS = streams_toml(
    ("compact", "/compact", "Bearer test-token"), ("spelled", "/spelled", "Bearer test-token")
)
STORED_ROWS = """
SELECT ident, ts, server_ts, channel_id, device_id, latitude, longitude, partition_ts, payload
FROM messages WHERE stream = $1 ORDER BY id
"""

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
known_values = {
    "ident": st.text(max_size=6) | st.integers(),
    "timestamp": st.floats(1.7e9, 1.8e9) | st.integers(1_700_000_000, 1_800_000_000),
    "server.timestamp": st.floats(1.7e9, 1.8e9),
    "channel.id": st.integers(0, 10**6),
    "position.latitude": st.floats(-90, 90),
}
messages = st.fixed_dictionaries({}, optional=known_values) | st.dictionaries(
    st.text(max_size=6), json_values, max_size=4
)
# elements that must be quarantined whatever their spelling: (kind, message)
bad = st.tuples(st.sampled_from(["duplicate", "nul", "array"]), messages)
# how many ordinary messages go with them: one INSERT, COPY, a body stored while it arrives
ORDINARY = {"insert": 0, "copy": SMALL_BATCH, "streamed": 200}


def bad_element(kind: str, message: dict[str, Any], spell: RandomSpelling) -> bytes:
    if kind == "duplicate":
        text = spell.text({**message, "dup": 1})
        return (text[:-1] + ',"d\\u0075p":2}').encode()
    if kind == "nul":
        return spell.text({**message, "nul": "a\x00b"}).encode()
    return spell.text([message]).encode()


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.large_base_example,
    ],
)
@given(
    path=st.sampled_from(sorted(ORDINARY)),
    batch=st.lists(messages | bad, min_size=1, max_size=8),
    seed=st.integers(0, 2**32),
)
async def test_any_spelling_stores_what_the_compact_form_stores(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    path: str,
    batch: list[Any],
    seed: int,
) -> None:
    await db.execute("TRUNCATE messages, rejected_messages")
    rng = random.Random(seed)
    spell = RandomSpelling(rng)
    batch = batch + [flespi_message(i) for i in range(ORDINARY[path])]
    rng.shuffle(batch)
    compact = [
        bad_element(*item, RandomSpelling(random.Random(0)))
        if isinstance(item, tuple)
        else json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
        for item in batch
    ]
    # the same bytes are the same message: each distinct message gets one spelling
    spellings: dict[bytes, bytes] = {}
    for item, text in zip(batch, compact, strict=True):
        if text not in spellings:
            spellings[text] = (
                bad_element(*item, spell) if isinstance(item, tuple) else spell.text(item).encode()
            )
    spelled_elements = [spellings[text] for text in compact]
    client = await receiver(streams=SPELLING_STREAMS)
    try:
        replies = []
        for stream, body in (
            ("compact", b"[" + b",".join(compact) + b"]"),
            ("spelled", spell.body(spelled_elements)),
        ):
            headers = {**AUTH, "Content-Length": str(len(body))}
            reply = await client.post(f"/{stream}", data=body, headers=headers)
            replies.append((reply.status, await reply.json()))
        assert replies[0] == replies[1]
        assert replies[0][0] == 200
        # the same rows: derived columns, and the payload as jsonb (1.50 = 1.5)
        rows = {s: await db.fetch(STORED_ROWS, s) for s in ("compact", "spelled")}
        assert [r[:-1] for r in rows["compact"]] == [r[:-1] for r in rows["spelled"]]
        equal = await db.fetchval(
            """
            SELECT bool_and(c.payload = s.payload) FROM
              (SELECT payload, row_number() OVER (ORDER BY id) n FROM messages
               WHERE stream = 'compact') c
            JOIN (SELECT payload, row_number() OVER (ORDER BY id) n FROM messages
                  WHERE stream = 'spelled') s USING (n)
            """
        )
        assert equal in (True, None)
        reasons = {
            s: await db.fetch(
                "SELECT reason FROM rejected_messages WHERE stream = $1 ORDER BY id", s
            )
            for s in ("compact", "spelled")
        }
        assert reasons["compact"] == reasons["spelled"]
    finally:
        await client.close()


RENAMED_STREAM = """
[[streams]]
name = "main"
path = "/flespi"
authorization = ["Bearer test-token"]
[streams.fields]
notation = "underscore"
latitude = "lat"
"""


async def test_a_stream_reads_its_fields_by_the_names_it_is_configured_with(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(streams=RENAMED_STREAM)
    renamed = {
        "ident": "A1",
        "timestamp": 1764000000.5,
        "server_timestamp": 1764000001,
        "channel_id": 7,
        "device_id": 8,
        "lat": 49.5,
        "position_longitude": 28.25,
        # the dotted names are just parameters for this stream
        "position.latitude": 1.0,
    }
    for size in (1, SMALL_BATCH + 1):  # one INSERT, then COPY
        batch = [{**renamed, "n": i, "size": size} for i in range(size)]
        reply = await client.post("/flespi", data=orjson.dumps(batch), headers=AUTH)
        assert (await reply.json())["stored"] == size
    rows = await db.fetch(
        "SELECT ident, extract(epoch FROM ts) AS ts, extract(epoch FROM server_ts) AS server_ts,"
        " channel_id, device_id, latitude, longitude FROM messages"
    )
    assert {tuple(row) for row in rows} == {("A1", 1764000000.5, 1764000001, 7, 8, 49.5, 28.25)}


async def test_a_batch_without_the_configured_time_fields_is_logged_once(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(streams=RENAMED_STREAM)
    dotted = [flespi_message(i) for i in range(3)]  # timestamp, but server.timestamp dotted
    for message in dotted:
        del message["timestamp"]
    with capture_logs() as logs:
        for start in range(3):
            body = orjson.dumps(dotted[start : start + 1])
            assert (await client.post("/flespi", data=body, headers=AUTH)).status == 200
    warnings = [e for e in logs if "time field" in e["event"]]
    assert len(warnings) == 1
    assert (warnings[0]["stream"], warnings[0]["server_ts_field"]) == ("main", "server_timestamp")
    assert await db.fetchval("SELECT count(*) FROM messages WHERE ts IS NULL") == 3


def test_check_config_shows_the_names_in_effect(make_settings: SettingsFactory) -> None:
    view = masked_view(make_settings(streams=RENAMED_STREAM))
    assert view["streams"][0]["fields"]["in_effect"] == {
        "ident": "ident",
        "ts": "timestamp",
        "server_ts": "server_timestamp",
        "channel_id": "channel_id",
        "device_id": "device_id",
        "latitude": "lat",
        "longitude": "position_longitude",
    }
    pascal = RENAMED_STREAM.replace('"underscore"', '"pascal"')
    names = masked_view(make_settings(streams=pascal))["streams"][0]["fields"]["in_effect"]
    assert names["server_ts"] == "ServerTimestamp"
    assert names["ident"] == "Ident"
