"""device_state does not depend on how messages were batched, ordered or spread over receivers;
one NOTIFY per batch whatever path stored it; existing databases keep their state on upgrade."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flespi_receiver.config import PartitioningSettings
from flespi_receiver.device_state import parameter_keys
from flespi_receiver.fields import columns
from flespi_receiver.migrate import migrate, migrations
from flespi_receiver.partitions import ensure_partitioned, maintain

from conftest import Client, ClientFactory
from helpers import message, send, state

MERGE = "device_state_merge = true"
# with this in every message, a batch of 60 or more is a body streamed as it arrives, 51..59
# take the COPY of a whole body, 50 and fewer the single INSERT
PAD = "x" * 1100


def identity(item: dict[str, Any]) -> bytes:
    return hashlib.sha256(orjson.dumps(item)).digest()[:16]


def order(item: dict[str, Any]) -> tuple[float, bytes]:
    ts = columns(item, orjson.dumps(item))[1]
    return (float("-inf") if ts is None else ts, identity(item))


def expected_state(items: list[dict[str, Any]], merge: bool) -> dict[str, dict[str, Any]]:
    """The state as a function of the set of messages: the latest by device time (ties by
    identity); in merge mode each parameter (and latitude, longitude) from the latest message
    that has it."""
    by_device: dict[str, list[dict[str, Any]]] = {}
    for item in {orjson.dumps(i): i for i in items}.values():
        by_device.setdefault(item["ident"], []).append(item)
    found = {}
    for ident, group in by_device.items():
        group.sort(key=order)
        latest = group[-1]
        payload: dict[str, Any] = {}
        latitude = longitude = None
        for item in group if merge else [latest]:
            payload.update(item)
            derived = columns(item, orjson.dumps(item))
            latitude = derived[5] if derived[5] is not None else latitude
            longitude = derived[6] if derived[6] is not None else longitude
        found[ident] = {
            "message_hash": identity(latest),
            "payload": payload,
            "latitude": latitude,
            "longitude": longitude,
        }
    return found


async def stored_state(db: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    rows = await db.fetch(
        "SELECT s.*, m.id AS pointed_id FROM device_state s LEFT JOIN messages m "
        "ON m.stream = s.stream AND m.message_hash = s.message_hash WHERE s.stream = 'main'"
    )
    for row in rows:
        assert row["message_id"] == row["pointed_id"]
    return {
        r["ident"]: {
            "message_hash": r["message_hash"],
            "payload": orjson.loads(r["payload"]),
            "latitude": r["latitude"],
            "longitude": r["longitude"],
        }
        for r in rows
    }


parameters = st.dictionaries(
    st.sampled_from(["a", "b", "c", "position.latitude", "position.longitude"]),
    st.sampled_from([0, 1, 2, None, 91]),  # 91: not a latitude, stays in payload only
    max_size=4,
)
messages = st.lists(
    st.builds(
        lambda ident, ts, extra: {"ident": ident, "pad": PAD, **extra, **ts},
        st.sampled_from(["A", "B", "C"]),
        st.sampled_from([{}, {"timestamp": 100}, {"timestamp": 101}, {"timestamp": 102.5}]),
        parameters,
    ),
    min_size=1,
    max_size=90,
)


async def deliver(clients: list[Client], batches: list[list[dict[str, Any]]]) -> None:
    """Batches dealt round-robin to the receivers, which send at the same time."""

    async def one(client: Client, share: list[list[dict[str, Any]]]) -> None:
        for batch in share:
            await send(client, *batch)

    await asyncio.gather(
        *(one(client, batches[i :: len(clients)]) for i, client in enumerate(clients))
    )


async def deliver_twice(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    data: st.DataObject,
    items: list[dict[str, Any]],
    merge: bool,
    receivers: int,
    again: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
) -> None:
    """`items` in a drawn order and drawn batches, dealt to `receivers` receivers, then
    `again(sent)` as one batch; the state must be the function of the messages."""
    await db.execute("TRUNCATE messages, device_latest")
    sent = data.draw(st.permutations(items))
    cuts = sorted(
        data.draw(st.sets(st.integers(1, len(sent) - 1), max_size=4)) if len(sent) > 1 else []
    )
    batches = [sent[a:b] for a, b in zip([0, *cuts], [*cuts, len(sent)], strict=True)]
    clients = [await receiver(database=MERGE if merge else "") for _ in range(receivers)]
    try:
        await deliver(clients, batches)
        await deliver(clients, [again(sent)])
    finally:
        for client in clients:
            await client.close()
    assert await stored_state(db) == expected_state(items, merge)


@pytest.mark.parametrize("merge", [False, True], ids=["latest", "merge"])
@pytest.mark.parametrize("receivers", [1, 2])
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(items=messages, data=st.data())
async def test_state_does_not_depend_on_batches_order_or_receivers(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    merge: bool,
    receivers: int,
    items: list[dict[str, Any]],
    data: st.DataObject,
) -> None:
    # and again, split otherwise: what was stored before changes nothing
    await deliver_twice(receiver, db, data, items, merge, receivers, again=lambda s: s[::-1])


# every message with the same parameters (a fleet whose trackers send the same set each time):
# merge mode then mostly moves each state to the batch's latest message, and leaves a state
# that is there already at once; an invalid latitude (91) in a latest message keeps an older
# valid one
same_parameters = st.lists(
    st.builds(
        lambda ident, ts, a, latitude, longitude: {
            "ident": ident,
            "pad": PAD,
            "a": a,
            "position.latitude": latitude,
            "position.longitude": longitude,
            **ts,
        },
        st.sampled_from(["A", "B", "C"]),
        st.sampled_from([{}, {"timestamp": 100}, {"timestamp": 101}, {"timestamp": 102.5}]),
        st.integers(0, 3),
        st.sampled_from([0, 1, None, 91]),
        st.sampled_from([0, 1, None]),
    ),
    min_size=1,
    max_size=90,
)


@pytest.mark.parametrize("receivers", [1, 2])
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(items=same_parameters, data=st.data())
async def test_merged_state_of_messages_with_the_same_parameters_does_not_depend_on_batches(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    receivers: int,
    items: list[dict[str, Any]],
    data: st.DataObject,
) -> None:
    # again, whole and in the order sent: every state is at its latest message already
    await deliver_twice(receiver, db, data, items, True, receivers, again=lambda s: s)


async def test_merge_does_not_go_backwards_when_a_batch_mixes_old_and_new(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(database=MERGE)
    position = ("position.latitude", "position.longitude")
    await send(
        client, message("dev", 1764000100, a=1, **dict(zip(position, (10, 20), strict=True)))
    )
    await send(
        client,
        message("dev", 1764000050, a=0, **dict(zip(position, (5, 5), strict=True))),
        message("dev", 1764000200, b=2),
    )
    merged = await state(db, "dev")
    assert orjson.loads(merged["payload"]) == {
        "ident": "dev",
        "timestamp": 1764000200,
        "a": 1,
        "b": 2,
        "position.latitude": 10,
        "position.longitude": 20,
    }
    assert (merged["latitude"], merged["longitude"]) == (10, 20)
    assert merged["ts"].timestamp() == 1764000200


async def test_merge_takes_a_later_position_for_a_state_already_at_the_latest_message(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    """The state is at M, whose latitude is not one (91), with the latitude of an earlier X; a
    batch then brings M again with Y, between X and M, whose latitude is valid: Y's is the
    last known latitude, though the state stays at M."""
    client = await receiver(database=MERGE)

    def located(ts: int, latitude: float) -> dict[str, Any]:
        return message("dev", ts, a=ts, **{"position.latitude": latitude, "position.longitude": 1})

    x, y, m = located(1764000100, 10), located(1764000150, 20), located(1764000200, 91)
    await send(client, x, m)
    assert (await state(db, "dev"))["latitude"] == 10
    await send(client, y, m)
    merged = await state(db, "dev")
    assert merged["ts"].timestamp() == 1764000200
    assert merged["latitude"] == 20
    assert orjson.loads(merged["payload"])["position.latitude"] == 91


async def notifications(database_url: str) -> tuple[asyncpg.Connection, asyncio.Queue[Any]]:
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[Any] = asyncio.Queue()
    await listener.add_listener(
        "flespi_messages", lambda *args: received.put_nowait(orjson.loads(args[3]))
    )
    return listener, received


@pytest.mark.parametrize("size", [5, 55, 80], ids=["insert", "copy", "streamed"])
async def test_one_notification_per_batch_whatever_path_stored_it(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str, size: int
) -> None:
    # a constraint of the user's refuses one message: the batch is stored one by one
    await db.execute("ALTER TABLE messages ADD CONSTRAINT no_bad CHECK (NOT payload ? 'bad')")
    client = await receiver()
    listener, received = await notifications(database_url)
    try:
        good = [message(f"d{i}", 100 + i, pad=PAD) for i in range(size)]
        reply = await send(client, *good[:2], message("d0", 1, bad=1), *good[2:])
        assert reply == {"stored": size, "duplicates": 0, "rejected": 1}
        ids = [r["id"] for r in await db.fetch("SELECT id FROM messages ORDER BY id")]
        note = await asyncio.wait_for(received.get(), 5)
        xact_id = await db.fetchval("SELECT max(xact_id)::text::numeric FROM messages")
        assert note == {
            "stream": "main",
            "count": size,
            "first_id": ids[0],
            "last_id": ids[-1],
            "xact_id": xact_id,
        }
        # and a batch that goes in whole says the same of itself
        more = [message(f"e{i}", 100 + i, pad=PAD) for i in range(size)]
        await send(client, *more)
        ids = [r["id"] for r in await db.fetch("SELECT id FROM messages ORDER BY id")][size:]
        note = await asyncio.wait_for(received.get(), 5)
        xact_id = await db.fetchval("SELECT max(xact_id)::text::numeric FROM messages")
        assert note == {
            "stream": "main",
            "count": size,
            "first_id": ids[0],
            "last_id": ids[-1],
            "xact_id": xact_id,
        }
        await asyncio.sleep(0.1)
        assert received.empty()
    finally:
        await listener.close()
    assert await db.fetchval("SELECT count(*) FROM device_state") == 2 * size


# device times at the ends of the accepted range and in between, to the microsecond
EDGE_TIMES = [
    -2208988800.0,
    -1.5,
    946684799.999999,
    1764000000.123457,
    32503680000.5,
    253402300799.0,
]


@pytest.mark.parametrize("size", [5, 55, 80], ids=["insert", "copy", "streamed"])
@pytest.mark.parametrize("merge", [False, True], ids=["latest", "merge"])
async def test_the_state_keeps_its_message_time_to_the_microsecond(
    receiver: ClientFactory, db: asyncpg.Connection, size: int, merge: bool
) -> None:
    # one device per time; devices without a time take their partition time from the server's
    items = [
        message(f"t{i}", EDGE_TIMES[i % len(EDGE_TIMES)], pad=PAD)
        if i % 3
        else message(f"t{i}", None, pad=PAD, **{"server.timestamp": EDGE_TIMES[i // 3 % 6]})
        for i in range(size)
    ]
    client = await receiver(database=MERGE if merge else "")
    assert (await send(client, *items))["stored"] == size
    rows = await db.fetch(
        "SELECT s.ident, s.ts, s.message_id, m.id, m.ts AS message_ts FROM device_state s "
        "JOIN messages m ON m.stream = s.stream AND m.message_hash = s.message_hash "
        "WHERE s.stream = 'main' AND s.ident = ANY($1::text[])",
        [item["ident"] for item in items],
    )
    assert len(rows) == size
    for row in rows:
        assert row["ts"] == row["message_ts"], row["ident"]
        assert row["message_id"] == row["id"], row["ident"]  # found by its partition time
    with_time = sum(1 for row in rows if row["ts"] is not None)
    assert with_time == sum(1 for item in items if "timestamp" in item)


OLD_MERGE_SESSION = {"flespi_receiver.device_state_merge": "on", "search_path": "flespi"}


async def test_an_existing_database_keeps_its_state(database_url: str) -> None:
    # a database as the previous version left it: state kept by the old trigger, in both modes
    admin = await asyncpg.connect(database_url)
    await admin.execute("DROP SCHEMA flespi CASCADE")
    await admin.execute("CREATE SCHEMA flespi")
    latest = await asyncpg.connect(database_url, server_settings={"search_path": "flespi"})
    merged = await asyncpg.connect(database_url, server_settings=OLD_MERGE_SESSION)
    try:
        await latest.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for old in migrations()[:6]:
            await latest.execute(old.sql)
            await latest.execute(
                "INSERT INTO schema_migrations VALUES ($1, $2)", old.version, old.name
            )
        insert = (
            "INSERT INTO messages (stream, ident, ts, latitude, longitude, partition_ts, payload, "
            "message_hash) SELECT $1, $2, to_timestamp($3), $4, $5, to_timestamp($3), $6, $7"
        )
        for conn, stream in ((latest, "plain"), (merged, "merged")):
            for i, (lat, extra) in enumerate([(50.0, {"fuel": 1}), (None, {"door": "open"})]):
                payload = {"ident": "A", "timestamp": 10 + i, **extra}
                if lat is not None:
                    payload["position.latitude"] = lat
                await conn.execute(
                    insert,
                    stream,
                    "A",
                    10 + i,
                    lat,
                    None,
                    orjson.dumps(payload).decode(),
                    bytes([i + 1]),
                )
        before = await latest.fetch("SELECT * FROM device_state ORDER BY stream")
        assert orjson.loads(before[0]["payload"])["fuel"] == 1  # merged
        assert await migrate(latest, "flespi")
        after = await latest.fetch("SELECT * FROM device_state ORDER BY stream")
        assert [dict(r) for r in after] == [dict(r) for r in before]
        # and it goes on from there: a later message merges into the merged state
        await merged.execute(
            insert,
            "merged",
            "A",
            20,
            None,
            None,
            '{"ident": "A", "timestamp": 20, "ac": 1}',
            b"\x09",
        )
        merged_now = orjson.loads(
            await latest.fetchval("SELECT payload FROM device_state WHERE stream = 'merged'")
        )
        assert merged_now == {
            "ident": "A",
            "timestamp": 20,
            "fuel": 1,
            "door": "open",
            "position.latitude": 50.0,
            "ac": 1,
        }
    finally:
        await latest.close()
        await merged.close()
        await admin.close()


async def test_retention_keeps_the_state_of_a_device_whose_latest_message_goes(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    from datetime import UTC, datetime

    monthly = PartitioningSettings(interval="month", ahead=1)
    await ensure_partitioned(db, monthly)
    await maintain(db, monthly, now=datetime(2026, 1, 15, tzinfo=UTC))
    client = await receiver()
    january = datetime(2026, 1, 10, tzinfo=UTC).timestamp()
    await send(client, message("A", january, **{"position.latitude": 1.5}))
    before = dict(await state(db))
    await client.close()  # its partitioning differs from the retention applied below
    keep_90_days = PartitioningSettings(interval="month", ahead=1, retention="90 days")
    await maintain(db, keep_90_days, now=datetime(2026, 11, 28, tzinfo=UTC))
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert dict(await state(db)) == before


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    keys=st.lists(
        st.text(
            st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=6
        ),
        max_size=6,
    )
)
async def test_the_receiver_digests_parameter_keys_as_postgresql_does(
    db: asyncpg.Connection, keys: list[str]
) -> None:
    payload = dict.fromkeys(keys, 1)
    sql = await db.fetchval("SELECT parameter_keys($1::jsonb)", orjson.dumps(payload).decode())
    assert parameter_keys(tuple(payload)) == sql


async def test_a_fleet_in_real_time_keeps_no_orders_in_merge_mode(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # every message with the same parameters, each batch later than the last: the batch's fold
    # is the new state as it is, and no parameter needs an order of its own
    client = await receiver(database=MERGE)
    sent: list[dict[str, Any]] = []
    for second in range(3):
        batch = [message(f"d{i}", 1764000000 + second, a=second, b=i) for i in range(3)]
        await send(client, *batch)
        sent += batch
    assert await stored_state(db) == expected_state(sent, merge=True)
    rows = await db.fetch("SELECT parameter_orders, parameter_keys FROM device_latest")
    assert {r["parameter_orders"] for r in rows} == {"{}"}
    # and the merged payload is the latest message's own: not written a second time
    assert await db.fetchval("SELECT count(*) FROM device_latest WHERE payload IS NULL") == 3
    # a message without `b`, then an older one with `c`: each kept where it belongs
    later = message("d0", 1764000010, a=9)
    await send(client, later, message("d0", 1764000005, c=5))
    assert await stored_state(db) == expected_state(
        [*sent, later, message("d0", 1764000005, c=5)], merge=True
    )
    orders = orjson.loads(
        await db.fetchval("SELECT parameter_orders FROM device_latest WHERE ident = 'd0'")
    )
    assert sorted(orders) == ["b", "c"]
