"""The row trigger on messages, for other sessions' inserts, exists only with device state on."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest

from flespi_receiver.config import PartitioningSettings
from flespi_receiver.database import apply_migrations
from flespi_receiver.partitions import ensure_partitioned
from flespi_receiver.trigger import apply_trigger, catch_up_pending

from conftest import ClientFactory, SettingsFactory
from helpers import count, message, send, state

BOTH_OFF = 'device_state = false\nnotify_channel = ""'
NOTIFY_ONLY = 'device_state = false\nnotify_channel = "batches"'

HAS_TRIGGER = """
SELECT count(*) = 1 FROM pg_trigger
WHERE tgname = 'messages_keep_device_state' AND tgrelid = 'messages'::regclass
"""


async def notifications(
    database_url: str, channel: str
) -> tuple[asyncpg.Connection, asyncio.Queue[str]]:
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(channel, lambda *args: received.put_nowait(args[3]))
    return listener, received


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
async def test_trigger_follows_the_settings(
    make_settings: SettingsFactory,
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
    partitioned: bool,
) -> None:
    if partitioned:
        await ensure_partitioned(db, PartitioningSettings(interval="month"))
    # both off: the trigger goes; messages are stored all the same
    off = make_settings(database=BOTH_OFF)
    await apply_migrations(off, database_url)
    assert not await db.fetchval(HAS_TRIGGER)
    client = await receiver(database=BOTH_OFF)
    await send(client, message("A", 10))
    assert await count(db) == 1
    assert await state(db) is None
    # notifications need no trigger: the receiver sends them itself; device state stays off
    await apply_migrations(make_settings(database=NOTIFY_ONLY), database_url)
    assert not await db.fetchval(HAS_TRIGGER)
    listener, received = await notifications(database_url, "batches")
    try:
        client = await receiver(database=NOTIFY_ONLY)
        await send(client, message("A", 20))
        assert orjson.loads(await asyncio.wait_for(received.get(), 5))["count"] == 1
        assert await state(db) is None
    finally:
        await listener.close()
    # the defaults: device state kept again, and the trigger is back for other sessions
    await apply_migrations(make_settings(), database_url)
    assert await db.fetchval(HAS_TRIGGER)
    assert (await state(db))["ts"].timestamp() == 20  # caught up with what came while off
    client = await receiver()
    await send(client, message("A", 30))
    assert (await state(db))["ts"].timestamp() == 30
    assert await count(db) == 3
    await db.execute(
        "INSERT INTO messages (stream, ident, ts, partition_ts, payload, message_hash) "
        "VALUES ('main', 'A', to_timestamp(40), to_timestamp(40), '{}', '\\x01')"
    )
    assert (await state(db))["ts"].timestamp() == 40


async def test_an_unchanged_setting_leaves_the_trigger_alone(
    make_settings: SettingsFactory, db: asyncpg.Connection, database_url: str
) -> None:
    oid = await db.fetchval(
        "SELECT oid FROM pg_trigger WHERE tgname = 'messages_keep_device_state'"
    )
    await apply_migrations(make_settings(), database_url)
    assert (
        await db.fetchval("SELECT oid FROM pg_trigger WHERE tgname = 'messages_keep_device_state'")
        == oid
    )


async def test_device_state_switched_back_on_catches_up_with_the_messages_stored_meanwhile(
    make_settings: SettingsFactory,
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    client = await receiver()
    await send(client, message("A", 1, tag="on"), message("B", 1, tag="on"))
    await client.close()
    off = "device_state = false"
    await apply_migrations(make_settings(database=off), database_url)
    client = await receiver(database=off)
    await send(client, message("A", 5, tag="off"), message("C", 5, tag="off"))
    await client.close()

    await apply_migrations(make_settings(), database_url)  # as `serve` starts
    client = await receiver()
    await send(client, message("A", 3, tag="late"), message("C", 2, tag="late"))
    tags = {
        row["ident"]: (row["ts"].timestamp(), orjson.loads(row["payload"])["tag"])
        for row in await db.fetch("SELECT * FROM device_state")
    }
    assert tags == {"A": (5, "off"), "B": (1, "on"), "C": (5, "off")}


async def test_merge_mode_switched_back_on_merges_the_messages_stored_meanwhile(
    make_settings: SettingsFactory,
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    """Merge mode keeps its states' values across device_state off and on: each state takes
    every later value of the messages stored meanwhile, and a device first seen meanwhile has
    all of its messages' values."""
    merge = "device_state_merge = true"

    def at(ident: str, ts: int, latitude: float | None = None, **values: int) -> dict[str, Any]:
        if latitude is not None:
            values = {**values, "position.latitude": latitude, "position.longitude": 1}
        return message(ident, ts, **values)

    client = await receiver(database=merge)
    await send(client, at("X", 100, latitude=10, a=1))
    await client.close()
    off = f"{merge}\ndevice_state = false"
    await apply_migrations(make_settings(database=off), database_url)
    client = await receiver(database=off)
    await send(client, at("X", 101, latitude=20, b=2), at("X", 102, c=3))
    await send(client, at("Y", 100, latitude=30, c=1), at("Y", 101, d=1))
    await client.close()

    await apply_migrations(make_settings(database=merge), database_url)  # as `serve` starts
    states = {r["ident"]: r for r in await db.fetch("SELECT * FROM device_state")}
    x, y = orjson.loads(states["X"]["payload"]), orjson.loads(states["Y"]["payload"])
    assert (x["a"], x["b"], x["c"], x["timestamp"], states["X"]["latitude"]) == (1, 2, 3, 102, 20)
    assert (y["c"], y["d"], y["timestamp"], states["Y"]["latitude"]) == (1, 1, 101, 30)
    # and merging goes on from there
    client = await receiver(database=merge)
    await send(client, at("X", 103, e=5))
    x = orjson.loads(await db.fetchval("SELECT payload FROM device_state WHERE ident = 'X'"))
    assert (x["a"], x["b"], x["c"], x["e"]) == (1, 2, 3, 5)


async def test_a_start_stopped_before_the_catch_up_leaves_it_to_the_next_start(
    make_settings: SettingsFactory,
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    """A start that made the trigger again and stopped before the catch-up committed (killed,
    or its catch-up cancelled by a statement_timeout) is caught up by the next start."""
    client = await receiver()
    await send(client, message("A", 1, tag="on"))
    await client.close()
    off = "device_state = false"
    await apply_migrations(make_settings(database=off), database_url)
    client = await receiver(database=off)
    await send(client, message("A", 5, tag="off"), message("B", 5, tag="off"))
    await client.close()
    # the first step of a start, as a start stopped right after it leaves the database
    await apply_trigger(db, make_settings().database)
    assert {r["ident"] for r in await db.fetch("SELECT ident FROM device_state")} == {"A"}

    await apply_migrations(make_settings(), database_url)  # the next start
    tags = {
        row["ident"]: orjson.loads(row["payload"])["tag"]
        for row in await db.fetch("SELECT * FROM device_state")
    }
    assert tags == {"A": "off", "B": "off"}
    # caught up once: a later start finds nothing pending
    assert not await catch_up_pending(db)


async def test_inserts_by_a_session_that_sets_nothing_keep_the_state_in_the_receivers_mode(
    make_settings: SettingsFactory,
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    """A psql session that sets nothing inserts into a database kept in merge mode: its row is
    merged into the state (it made the state that row alone); switched back to latest mode, the
    next row is the state."""
    merge = "device_state_merge = true"
    await apply_migrations(make_settings(database=merge), database_url)
    client = await receiver(database=merge)
    await send(client, message("A", 10, a=1, b=2))
    insert = (
        "INSERT INTO messages (stream, ident, ts, partition_ts, payload, message_hash) "
        "VALUES ('main', 'A', to_timestamp($1), to_timestamp($1), $2, $3)"
    )
    await db.execute(insert, 20, '{"ident": "A", "c": 3}', b"\x01")
    merged = orjson.loads((await state(db))["payload"])
    assert (merged["a"], merged["b"], merged["c"]) == (1, 2, 3)

    await apply_migrations(make_settings(), database_url)  # latest mode again
    await db.execute(insert, 30, '{"ident": "A", "d": 4}', b"\x02")
    assert orjson.loads((await state(db))["payload"]) == {"ident": "A", "d": 4}


async def test_rows_inserted_by_hand_while_a_merge_catch_up_waits_leave_it_whole(
    make_settings: SettingsFactory,
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    """Merge mode: while a catch-up waits for the next start, a row inserted by hand moves its
    device's state; the catch-up still takes every message stored since device_state went off
    (it went back to the row inserted by hand, older than one stored while off)."""
    merge = "device_state_merge = true"
    await apply_migrations(make_settings(database=merge), database_url)
    client = await receiver(database=merge)
    await send(client, message("X", 100, a=1))
    await client.close()
    off = f"{merge}\ndevice_state = false"
    await apply_migrations(make_settings(database=off), database_url)
    client = await receiver(database=off)
    await send(client, message("X", 300, c=3))
    await client.close()
    # a start stopped after making the trigger again, then a row inserted by hand
    await apply_trigger(db, make_settings(database=merge).database)
    await db.execute(
        "INSERT INTO messages (stream, ident, ts, partition_ts, payload, message_hash) "
        "VALUES ('main', 'X', to_timestamp(200), to_timestamp(200), '{\"ident\": \"X\", "
        "\"b\": 2}', '\\x01')"
    )

    await apply_migrations(make_settings(database=merge), database_url)  # the next start
    row = await state(db, "X")
    merged = orjson.loads(row["payload"])
    assert (row["ts"].timestamp(), merged["a"], merged["b"], merged["c"]) == (300, 1, 2, 3)


async def test_a_session_whose_transaction_set_device_state_keeps_it_for_its_later_rows(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    """A setting made with SET LOCAL reads '' once its transaction ends: unset, not off."""
    client = await receiver()
    await send(client, message("A", 10))
    insert = (
        "INSERT INTO messages (stream, ident, ts, partition_ts, payload, message_hash) "
        "VALUES ('main', 'A', to_timestamp($1), to_timestamp($1), '{}', $2)"
    )
    async with db.transaction():
        await db.execute("SET LOCAL flespi_receiver.device_state = 'on'")
        await db.execute(insert, 20, b"\x01")
    await db.execute(insert, 30, b"\x02")
    assert (await state(db))["ts"].timestamp() == 30
