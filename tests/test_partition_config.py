"""Every documented [partitioning] with every kind of [[columns]] starts, stores and restarts;
typed-column indexes on partitioned tables; a database whose DateStyle is not ISO."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest

from flespi_receiver.app import connection_settings
from flespi_receiver.columns import apply_columns
from flespi_receiver.config import ColumnSettings, PartitioningSettings, Settings
from flespi_receiver.embedded import free_port
from flespi_receiver.partitions import ensure_partitioned, maintain
from flespi_receiver.trigger import apply_trigger

from conftest import STREAM_TOML, ClientFactory, SettingsFactory
from helpers import AUTH, append_toml, config_file, count, finished, start_command

COLUMN_TYPES = {
    "speed": ("position.speed", "double precision"),
    "odometer": ("can.vehicle.mileage", "bigint"),
    "ignition": ("engine.ignition.status", "boolean"),
    "driver": ("driver.name", "text"),
    "reported": ("report.time", "timestamptz"),
}
NOW = datetime.now(UTC)


def columns_toml(kind: str) -> str:
    """No [[columns]], all of them plain or all indexed, or "mixed": the first two indexed."""
    if kind == "no columns":
        return ""
    indexed = len(COLUMN_TYPES) if kind == "indexed columns" else 2
    return "".join(
        f'\n[[columns]]\nname = "{name}"\nparameter = "{parameter}"\ntype = "{type_}"\n'
        f"index = {'true' if n < indexed else 'false'}\n"
        for n, (name, (parameter, type_)) in enumerate(COLUMN_TYPES.items())
    )


def message(ident: str, at: datetime | None) -> dict[str, object]:
    found: dict[str, object] = {
        "ident": ident,
        "position.speed": 61.5,
        "can.vehicle.mileage": 123456,
        "engine.ignition.status": True,
        "driver.name": "Олена",
        "report.time": 1764000000,
    }
    if at is not None:
        found["timestamp"] = at.timestamp()
    return found


async def start(settings: Settings) -> None:
    """What `serve` does to the schema before it listens (cli: apply_migrations)."""
    dsn = settings.database.url.get_secret_value()
    conn = await asyncpg.connect(dsn, server_settings=connection_settings(settings))
    try:
        await ensure_partitioned(conn, settings.partitioning)
        assert await maintain(conn, settings.partitioning)
        await apply_columns(conn, settings.columns)
        await apply_trigger(conn, settings.database)
    finally:
        await conn.close()


async def index_parts_missing(db: asyncpg.Connection, index: str) -> int:
    """Partitions of messages without a part of `index` (0 on a plain table)."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'messages'::regclass AND NOT EXISTS ("
            "  SELECT 1 FROM pg_inherits ii JOIN pg_index x ON x.indexrelid = ii.inhrelid"
            "  WHERE ii.inhparent = to_regclass($1) AND x.indrelid = c.oid)",
            index,
        )
    )


VALID = "SELECT indisvalid FROM pg_index WHERE indexrelid = $1::regclass"
PARTITIONINGS = [
    '[partitioning]\ninterval = "none"\n',
    '[partitioning]\ninterval = "day"\nahead = 2\n',
    '[partitioning]\ninterval = "week"\nahead = 3\nretention = "12 weeks"\n',
    '[partitioning]\ninterval = "month"\nretention = "90 days"\n',
    '[partitioning]\ninterval = "month"\nahead = 1\nretention = "1 year"\n',
]


# each [partitioning] with typed columns of every type, indexed and not; two without columns
COMBINATIONS = [(p, "mixed") for p in PARTITIONINGS] + [
    (PARTITIONINGS[0], "no columns"),
    (PARTITIONINGS[3], "no columns"),
]


@pytest.mark.parametrize(
    ("partitioning", "columns"),
    COMBINATIONS,
    ids=["none", "day", "week", "month", "month-short", "none-no-columns", "month-no-columns"],
)
async def test_every_partitioning_with_every_kind_of_columns_starts_and_stores(
    receiver: ClientFactory,
    make_settings: SettingsFactory,
    db: asyncpg.Connection,
    partitioning: str,
    columns: str,
) -> None:
    config = STREAM_TOML + partitioning + columns_toml(columns)
    settings = make_settings(streams=config)
    await start(settings)
    await start(settings)  # a second start finds everything in place
    client = await receiver(streams=config)
    batch = [
        message("now", NOW),
        message("last-month", NOW - timedelta(days=31)),
        message("far-future", NOW + timedelta(days=3000)),
        message("no-time", None),
    ]
    reply = await client.post("/flespi", data=orjson.dumps(batch), headers=AUTH)
    assert (await reply.json())["stored"] == 4
    assert await count(db) == 4
    if columns != "no columns":
        typed = await db.fetchrow(
            "SELECT speed, odometer, ignition, driver, reported FROM messages_typed "
            "WHERE ident = 'now'"
        )
        assert tuple(typed.values())[:4] == (61.5, 123456, True, "Олена")
    if columns == "mixed":
        for name in list(COLUMN_TYPES)[:2]:
            index = f"messages_typed_{name}"
            assert await db.fetchval(VALID, index)
            assert await index_parts_missing(db, index) == 0
        await db.execute("SET enable_seqscan = off")
        plan = await db.fetch("EXPLAIN SELECT id FROM messages_typed WHERE speed > 50")
        assert "Seq Scan" not in "\n".join(r[0] for r in plan)


async def test_a_partition_made_later_gets_the_typed_index(db: asyncpg.Connection) -> None:
    monthly = PartitioningSettings(interval="month", ahead=1)
    await ensure_partitioned(db, monthly)
    await maintain(db, monthly, now=NOW)
    speed = ColumnSettings(
        name="speed", parameter="position.speed", type="double precision", index=True
    )
    await apply_columns(db, [speed])
    await maintain(db, monthly, now=NOW + timedelta(days=200))  # six more months
    assert await index_parts_missing(db, "messages_typed_speed") == 0
    assert await db.fetchval(VALID, "messages_typed_speed")


async def test_a_database_whose_datestyle_is_not_iso(tmp_path: Path, database_url: str) -> None:
    name = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(database_url)
    await admin.execute(
        f"ALTER DATABASE {name} SET datestyle = 'SQL, DMY'; "
        f"ALTER DATABASE {name} SET intervalstyle = 'sql_standard'; "
        f"ALTER DATABASE {name} SET timezone = 'Asia/Kolkata'"
    )
    await admin.close()
    config = append_toml(
        config_file(tmp_path, database_url, free_port()),
        '[partitioning]\ninterval = "day"\nahead = 2\nretention = "3 days"\n'
        + columns_toml("indexed columns"),
    )
    for _ in range(2):  # the second start reads the bounds of the partitions it made
        status, stderr = await finished(await start_command("migrate", config))
        assert status == 0, stderr
    # a session with the database's settings, none of the receiver's, runs the upkeep
    db = await asyncpg.connect(database_url, server_settings={"search_path": "flespi"})
    try:
        assert await db.fetchval("SHOW datestyle") == "SQL, DMY"
        early = NOW + timedelta(days=10)
        await db.execute(
            "INSERT INTO messages (stream, ident, partition_ts, payload, message_hash) "
            "VALUES ('main', 'early', $1, '{}', '\\x01')",
            early,
        )
        keep = PartitioningSettings(interval="day", ahead=2, retention="3 days")
        assert await maintain(db, keep, now=early)
        days = await db.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'messages'::regclass ORDER BY 1"
        )
        # those made around now are past retention; the day before `early` to 2 after it
        expected = {f"messages_p{early + timedelta(days=d):%Y%m%d}" for d in range(-1, 3)}
        assert {r[0] for r in days} - {"messages_default"} == expected
        assert (
            await db.fetchval("SELECT tableoid::regclass::text FROM messages WHERE ident = 'early'")
            == f"messages_p{early:%Y%m%d}"
        )
    finally:
        await db.close()


async def test_receivers_starting_at_once_all_start(tmp_path: Path, database_url: str) -> None:
    # each start builds the indexes that are missing (concurrently): one receiver at a time
    configs = [
        append_toml(
            config_file(tmp_path, database_url, free_port(), f"r{n}"),
            '[partitioning]\ninterval = "month"\n' + columns_toml("indexed columns"),
        )
        for n in range(3)
    ]
    starts = [await start_command("migrate", config) for config in configs]
    for process in starts:
        status, stderr = await finished(process)
        assert status == 0, stderr
    db = await asyncpg.connect(database_url, server_settings={"search_path": "flespi"})
    try:
        for index in ["messages_xact_id", *(f"messages_typed_{n}" for n in COLUMN_TYPES)]:
            assert await db.fetchval(VALID, index), index
            assert await index_parts_missing(db, index) == 0
    finally:
        await db.close()
