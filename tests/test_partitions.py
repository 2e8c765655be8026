"""Time partitioning: partitions around now, the default partition, retention, exactly once."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest

from flespi_receiver.config import PartitioningSettings
from flespi_receiver.embedded import free_port
from flespi_receiver.errors import ConfigError
from flespi_receiver.partitions import ensure_partitioned, maintain, periods_around

from conftest import ClientFactory
from helpers import AUTH, SCRIPT, config_file, count

MONTHLY = PartitioningSettings(interval="month", ahead=2)
BOUNDARY = datetime(2026, 11, 1, tzinfo=UTC).timestamp()


async def partition_of(db: asyncpg.Connection) -> dict[str, str]:
    rows = await db.fetch("SELECT ident, tableoid::regclass::text AS part FROM messages")
    return {r["ident"]: r["part"] for r in rows}


async def partition_tables(db: asyncpg.Connection) -> set[str]:
    query = "SELECT tablename FROM pg_tables WHERE tablename LIKE 'messages\\_%'"
    return {r[0] for r in await db.fetch(query)}


async def partitioned(db: asyncpg.Connection, now: datetime) -> None:
    await ensure_partitioned(db, MONTHLY)
    await maintain(db, MONTHLY, now=now)


def test_periods_cover_the_month_before_now_and_ahead() -> None:
    months = periods_around(datetime(2026, 1, 15, 12, tzinfo=UTC), "month", 2)
    assert [p.name for p in months] == [
        "messages_p20251201",
        "messages_p20260101",
        "messages_p20260201",
        "messages_p20260301",
    ]
    weeks = periods_around(datetime(2026, 11, 28, tzinfo=UTC), "week", 1)  # a Saturday
    assert [p.start.day for p in weeks] == [16, 23, 30]


async def test_messages_land_in_their_month_across_a_boundary(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    await partitioned(db, datetime(2026, 11, 28, tzinfo=UTC))
    client = await receiver()
    batch = [
        {"ident": "october", "timestamp": BOUNDARY - 1},
        {"ident": "november", "timestamp": BOUNDARY},
        {"ident": "clock-reset", "timestamp": 0},
        {"ident": "no-time"},
        {"ident": "far-future", "timestamp": datetime(2031, 5, 1, tzinfo=UTC).timestamp()},
    ]
    body = orjson.dumps(batch)
    reply = await client.post("/flespi", data=body, headers=AUTH)
    assert (await reply.json())["stored"] == 5
    assert await partition_of(db) == {
        "october": "messages_p20261001",
        "november": "messages_p20261101",
        "clock-reset": "messages_default",
        "no-time": "messages_default",
        "far-future": "messages_default",
    }
    # exactly once holds across partitions, the default one included
    again = await client.post("/flespi", data=body, headers=AUTH)
    assert (await again.json())["duplicates"] == 5
    assert await count(db) == 5
    assert await count(db, "device_state") == 5


async def test_a_new_partition_takes_its_rows_from_the_default(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    await partitioned(db, datetime(2026, 11, 28, tzinfo=UTC))
    client = await receiver()
    future = [{"ident": "early-bird", "timestamp": datetime(2027, 3, 10, tzinfo=UTC).timestamp()}]
    await client.post("/flespi", data=orjson.dumps(future), headers=AUTH)
    assert await partition_of(db) == {"early-bird": "messages_default"}
    await maintain(db, MONTHLY, now=datetime(2027, 2, 20, tzinfo=UTC))  # March is made now
    assert await partition_of(db) == {"early-bird": "messages_p20270301"}
    again = await client.post("/flespi", data=orjson.dumps(future), headers=AUTH)
    assert (await again.json())["duplicates"] == 1


async def test_retention_drops_whole_old_partitions(db: asyncpg.Connection) -> None:
    await partitioned(db, datetime(2026, 1, 15, tzinfo=UTC))
    await maintain(db, MONTHLY, now=datetime(2026, 11, 28, tzinfo=UTC))
    assert "messages_p20251201" in await partition_tables(db)
    keep_90_days = PartitioningSettings(interval="month", ahead=2, retention="90 days")
    await maintain(db, keep_90_days, now=datetime(2026, 11, 28, tzinfo=UTC))
    left = await partition_tables(db)
    # 2026-11-28 minus 90 days is 2026-08-30: months ending on or before it are gone
    assert left == {
        "messages_default",
        "messages_p20261001",
        "messages_p20261101",
        "messages_p20261201",
        "messages_p20270101",
    }
    assert "messages_default" in left


async def test_a_table_with_messages_is_not_converted_silently(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    await client.post("/flespi", data=b'[{"ident": "x"}]', headers=AUTH)
    with pytest.raises(ConfigError, match=r"docs/scaling\.md"):
        await ensure_partitioned(db, MONTHLY)
    assert await db.fetchval("SELECT relkind FROM pg_class WHERE relname = 'messages'") == b"r"


def test_migrate_partitions_a_fresh_install(tmp_path: Path, database_url: str) -> None:
    config = config_file(tmp_path, database_url, free_port())
    config.write_text(
        config.read_text() + '[partitioning]\ninterval = "day"\nahead = 2\nretention = "30 days"\n'
    )
    result = subprocess.run(
        [str(SCRIPT), "migrate", "--config", str(config)], capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr
    days = asyncio.run(day_partitions(database_url))
    today = datetime.now(UTC).strftime("messages_p%Y%m%d")
    assert today in days
    assert len(days) == 4  # yesterday, today and two ahead


async def day_partitions(database_url: str) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'flespi.messages'::regclass AND c.relname <> 'messages_default'"
        )
        return {r[0] for r in rows}
    finally:
        await conn.close()
