"""Device state and notifications: what apps read instead of scanning messages."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest

from flespi_receiver.database import apply_migrations
from flespi_receiver.messages import identity_of

from conftest import ClientFactory, SettingsFactory
from helpers import AUTH, count, message, send, state, streams_toml


@pytest.mark.parametrize("filler", [0, 80], ids=["small-batch", "copy-batch"])
async def test_state_is_the_latest_by_device_time_not_arrival(
    receiver: ClientFactory, db: asyncpg.Connection, filler: int
) -> None:
    client = await receiver()
    others = [message(f"other{i}", 1000 + i) for i in range(filler)]
    await send(client, message("A", 100, speed=1), *others)
    await send(client, message("A", 50, speed=2), message(None, 500, speed=3))  # late, no ident
    latest = await state(db)
    assert (latest["ts"].timestamp(), orjson.loads(latest["payload"])["speed"]) == (100, 1)
    await send(client, message("A", 90, speed=4), message("A", 150, speed=5), message("A", 120))
    latest = await state(db)
    assert (latest["ts"].timestamp(), orjson.loads(latest["payload"])["speed"]) == (150, 5)
    stored_id = await db.fetchval("SELECT id FROM messages WHERE payload->>'speed' = '5'")
    assert latest["message_id"] == stored_id
    assert await db.fetchval("SELECT count(*) FROM device_state") == 1 + filler


@pytest.mark.parametrize("filler", [0, 80], ids=["small-batch", "copy-batch"])
@pytest.mark.parametrize("mode", ["", "device_state_merge = true"], ids=["latest", "merge"])
async def test_state_keeps_the_stored_time_to_the_microsecond(
    receiver: ClientFactory, db: asyncpg.Connection, filler: int, mode: str
) -> None:
    """The state's time and partition time are the stored message's, whichever side of
    2000-01-01 (the receiver sends microseconds since then) and of a second it falls."""
    client = await receiver(database=mode)
    times = [
        946684799.999999,
        946684800.000001,
        100.000001,
        -86400.5,
        1764000000.123456,
        4102444800.654321,
    ]
    items = [message(f"t{n}", ts) for n, ts in enumerate(times)]
    await send(client, *items, *(message(f"other{i}", 1000 + i) for i in range(filler)))
    rows = await db.fetch(
        "SELECT d.ident, d.ts = m.ts AS same_time, d.partition_ts = m.partition_ts AS same_part "
        "FROM device_latest d JOIN messages m USING (stream, message_hash) "
        "WHERE d.ident LIKE 't%' ORDER BY d.ident"
    )
    assert [(r["ident"], r["same_time"], r["same_part"]) for r in rows] == [
        (f"t{n}", True, True) for n in range(len(times))
    ]


@pytest.mark.parametrize("filler", [0, 80], ids=["small-batch", "copy-batch"])
async def test_merge_keeps_every_value_as_it_was_sent(
    receiver: ClientFactory, db: asyncpg.Connection, filler: int
) -> None:
    """Numbers beyond a double (an integer of 23 digits, a decimal of 34) and a decimal's
    trailing zero stay as sent in the merged state, whichever batch brings them and whether
    they come from the latest message or an earlier one."""
    client = await receiver(database="device_state_merge = true")
    batches = 0
    pad = b"x" * 1100  # 60 messages or more: a body stored as it arrives, by COPY

    async def post(*texts: bytes) -> None:
        nonlocal batches
        batches += 1
        others = [
            b'{"ident":"other%d","timestamp":%d,"pad":"%s"}' % (i, 1000 * batches + i, pad)
            for i in range(filler)
        ]
        reply = await client.post(
            "/flespi", data=b"[" + b",".join([*texts, *others]) + b"]", headers=AUTH
        )
        assert reply.status == 200, await reply.text()

    await post(b'{"ident":"x","timestamp":1764000000,"a":1,"d":0.30}')
    await post(
        b'{"ident":"x","timestamp":1764000001,"a":12345678901234567890123,'
        b'"b":0.1000000000000000055511151231257827,"c":1.50}'
    )
    # e comes from an earlier message of the batch than its latest, which lacks it
    await post(
        b'{"ident":"x","timestamp":1764000002,"e":-98765432109876543210.5}',
        b'{"ident":"x","timestamp":1764000003,"z":1}',
    )
    values = await db.fetchrow(
        "SELECT payload->>'a' AS a, payload->>'b' AS b, payload->>'c' AS c, payload->>'d' AS d, "
        "payload->>'e' AS e, payload->>'z' AS z FROM device_state WHERE ident = 'x'"
    )
    assert dict(values) == {
        "a": "12345678901234567890123",
        "b": "0.1000000000000000055511151231257827",
        "c": "1.50",
        "d": "0.30",
        "e": "-98765432109876543210.5",
        "z": "1",
    }


TWO_STREAMS = streams_toml(
    ("main", "/flespi", "Bearer test-token"), ("other", "/other", "Bearer test-token")
)


def tied(later: float, earlier: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two messages of device A at these times, the one at `earlier` with the greater
    identity: the tie, if PostgreSQL stores both times as one, goes to it."""
    for speed in range(100):
        one, two = message("A", later, speed=speed), message("A", earlier, speed=-1 - speed)
        if identity_of(orjson.dumps(two)) > identity_of(orjson.dumps(one)):
            return one, two
    raise AssertionError("no such pair")


@pytest.mark.parametrize(
    "times",
    [(100, 100), (1764000000.0000004, 1764000000.0000001)],
    ids=["equal", "within-a-microsecond"],
)
@pytest.mark.parametrize("mode", ["", "device_state_merge = true"], ids=["latest", "merge"])
async def test_equal_times_resolve_the_same_whatever_the_order(
    receiver: ClientFactory, db: asyncpg.Connection, times: tuple[float, float], mode: str
) -> None:
    client = await receiver(streams=TWO_STREAMS, database=mode)
    one, two = tied(*times)
    await send(client, one, two)  # one order, in one batch
    for item in (two, one):  # the other order, across batches, on the other stream
        reply = await client.post("/other", data=orjson.dumps([item]), headers=AUTH)
        assert reply.status == 200
    states = await db.fetch("SELECT stream, payload FROM device_state ORDER BY stream")
    assert [r["stream"] for r in states] == ["main", "other"]
    assert states[0]["payload"] == states[1]["payload"]
    winner = await db.fetchval(
        "SELECT payload FROM messages WHERE stream = 'main' ORDER BY message_hash DESC LIMIT 1"
    )
    assert states[0]["payload"] == winner


async def test_merge_keeps_the_last_known_value_of_every_parameter(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(database="device_state_merge = true")
    await send(
        client,
        message("A", 10, **{"position.latitude": 50.5, "position.longitude": 30.5, "fuel": 40}),
        message("A", 20, fuel=38, ignition=True),  # no position: the last one stays
    )
    merged = await state(db)
    assert (merged["latitude"], merged["longitude"], merged["ts"].timestamp()) == (50.5, 30.5, 20)
    assert orjson.loads(merged["payload"]) == {
        "ident": "A",
        "timestamp": 20,
        "position.latitude": 50.5,
        "position.longitude": 30.5,
        "fuel": 38,
        "ignition": True,
    }
    await send(client, message("A", 5, fuel=99, door="open"))  # late: fills in, never overrides
    late = await state(db)
    assert orjson.loads(late["payload"])["fuel"] == 38
    assert orjson.loads(late["payload"])["door"] == "open"
    assert late["ts"].timestamp() == 20


async def test_device_state_can_be_switched_off(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(database="device_state = false")
    await send(client, message("A", 10))
    assert await count(db) == 1
    assert await count(db, "device_state") == 0


async def test_notification_after_each_commit(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str
) -> None:
    client = await receiver()
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("flespi_messages", lambda *args: received.put_nowait(args[3]))
    try:
        await send(client, message("A", 1), message("B", 2), message("C", 3))
        note = orjson.loads(await asyncio.wait_for(received.get(), 5))
        rows = await db.fetch("SELECT id, xact_id FROM messages ORDER BY id")
        assert note == {
            "stream": "main",
            "count": 3,
            "first_id": rows[0]["id"],
            "last_id": rows[-1]["id"],
            "xact_id": rows[0]["xact_id"],  # the batch's position for readers (docs/sql.md)
        }
        assert rows[0]["xact_id"] == rows[-1]["xact_id"]
        # a batch that stores nothing new says nothing
        await send(client, message("A", 1))
        await send(client, message("D", 4))
        assert orjson.loads(await asyncio.wait_for(received.get(), 5))["count"] == 1
        assert received.empty()
    finally:
        await listener.close()


async def test_inserts_from_any_session_keep_the_state(
    receiver: ClientFactory, database_url: str
) -> None:
    # a backfill from psql, with the default search_path and none of the receiver's settings
    await receiver()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO flespi.messages (stream, ident, ts, partition_ts, payload, message_hash) "
            "VALUES ('main', 'A', now(), now(), '{}', '\\x01')"
        )
        assert await conn.fetchval("SELECT count(*) FROM flespi.device_state") == 1
    finally:
        await conn.close()


async def test_merge_mode_switched_off_shows_each_device_its_latest_message(
    receiver: ClientFactory, db: asyncpg.Connection, make_settings: SettingsFactory
) -> None:
    position = {"position.latitude": 10.0, "position.longitude": 20.0}
    merging = await receiver(database="device_state_merge = true")
    await send(merging, message("A", 100, p=1, **position), message("B", 100, p=1))
    await send(merging, message("A", 200, q=2))
    merged = await state(db)
    assert (orjson.loads(merged["payload"])["p"], merged["latitude"]) == (1, 10.0)
    await merging.close()

    # latest mode on the same database, started as `serve` starts (schema brought up to date)
    settings = make_settings()
    await apply_migrations(settings, settings.database.url.get_secret_value())
    latest_mode = await receiver()
    await send(latest_mode, message("A", 150, r=3))  # older than the state: changes nothing
    latest = await state(db)
    assert orjson.loads(latest["payload"]) == message("A", 200, q=2)
    assert (latest["latitude"], latest["longitude"]) == (None, None)
    # B's latest message is its only one: the same either way
    assert orjson.loads((await state(db, "B"))["payload"]) == message("B", 100, p=1)
