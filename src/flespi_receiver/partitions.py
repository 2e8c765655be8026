"""Time partitioning of `messages` by `partition_ts`: partitions made ahead, old ones dropped.

Native declarative partitioning, by day, week or month. A default partition takes what no
partition covers (devices with a wrong clock, messages without time); when a partition is
made later, the rows of its range move out of the default partition first. Retention drops
whole partitions, never rows one by one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from flespi_receiver.config import PartitioningSettings
from flespi_receiver.errors import ConfigError
from flespi_receiver.store import Connection

log = structlog.get_logger("flespi_receiver.partitions")

LOCK = "SELECT pg_advisory_xact_lock(hashtext('flespi_receiver:partitions:' || current_schema()))"
IS_PARTITIONED = """
SELECT c.relkind = 'p' FROM pg_class c
WHERE c.oid = to_regclass(current_schema() || '.messages')
"""
PARTITIONS = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass(current_schema() || '.messages')
"""
BOUNDS = re.compile(r"FROM \('([^']+)'\) TO \('([^']+)'\)")
DEFAULT_PARTITION = "messages_default"
RETENTION_LIMIT = "SELECT $1::timestamptz - $2::text::interval"

# A fresh, empty, plain messages table becomes a partitioned one with the same columns,
# indexes and trigger.
CONVERT = """
CREATE TABLE messages_partitioned (LIKE messages INCLUDING ALL) PARTITION BY RANGE (partition_ts);
DROP VIEW IF EXISTS messages_typed;
DROP TABLE messages;
ALTER TABLE messages_partitioned RENAME TO messages;
CREATE TABLE messages_default PARTITION OF messages DEFAULT;
CREATE TRIGGER messages_after_insert
    AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_messages
    FOR EACH STATEMENT EXECUTE FUNCTION after_messages_insert();
"""


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime

    @property
    def name(self) -> str:
        return f"messages_p{self.start:%Y%m%d}"


def period_start(moment: datetime, interval: str) -> datetime:
    day = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "day":
        return day
    if interval == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def next_start(start: datetime, interval: str) -> datetime:
    if interval == "day":
        return start + timedelta(days=1)
    if interval == "week":
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


def periods_around(now: datetime, interval: str, ahead: int) -> list[Period]:
    """The period before now's, now's, and `ahead` more."""
    start = period_start(now, interval)
    previous = period_start(start - timedelta(days=1), interval)
    found = []
    current = previous
    for _ in range(ahead + 2):
        end = next_start(current, interval)
        found.append(Period(current, end))
        current = end
    return found


async def ensure_partitioned(conn: Connection, settings: PartitioningSettings) -> None:
    """Turn the plain messages table into a partitioned one, if configured and still empty."""
    if settings.interval == "none":
        return
    async with conn.transaction():
        await conn.execute(LOCK)
        if await conn.fetchval(IS_PARTITIONED):
            return
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM messages)"):
            raise ConfigError(
                "partitioning.interval is set but messages is a plain table that already holds "
                'messages; convert it as docs/scaling.md describes, or set interval = "none"'
            )
        await conn.execute(CONVERT)
        log.info("messages is now partitioned", interval=settings.interval)


async def maintain(
    conn: Connection, settings: PartitioningSettings, now: datetime | None = None
) -> None:
    """Create the partitions around `now` and drop those past retention."""
    if settings.interval == "none" or not await conn.fetchval(IS_PARTITIONED):
        return
    now = now or datetime.now(UTC)
    async with conn.transaction():
        await conn.execute(LOCK)
        existing = {row[0]: row[1] for row in await conn.fetch(PARTITIONS)}
        for period in periods_around(now, settings.interval, settings.ahead):
            if period.name not in existing:
                await _create(conn, period)
        if settings.retention:
            limit = await conn.fetchval(RETENTION_LIMIT, now, settings.retention)
            await _drop_older_than(conn, existing, limit)


async def _create(conn: Connection, period: Period) -> None:
    name = period.name  # built from a date only: safe as an identifier
    await conn.execute(f"CREATE TABLE {name} (LIKE messages INCLUDING DEFAULTS)")
    # rows that waited in the default partition for this period move in first
    moved = await conn.execute(
        # the names are constants and dates, never user input
        f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} "  # noqa: S608
        "WHERE partition_ts >= $1 AND partition_ts < $2 RETURNING *) "
        f"INSERT INTO {name} SELECT * FROM moved",
        period.start,
        period.end,
    )
    await conn.execute(
        f"ALTER TABLE messages ATTACH PARTITION {name} FOR VALUES FROM "
        f"('{period.start.isoformat()}') TO ('{period.end.isoformat()}')"
    )
    log.info("partition created", partition=name, moved_from_default=moved.split()[-1])


async def _drop_older_than(conn: Connection, existing: dict[str, str], limit: datetime) -> None:
    for name, bounds in sorted(existing.items()):
        match = BOUNDS.search(bounds)
        if name == DEFAULT_PARTITION or match is None:
            continue
        end = datetime.fromisoformat(match.group(2))
        if end <= limit:
            await conn.execute(f"DROP TABLE {name}")
            log.info("partition dropped by retention", partition=name, ended=end.isoformat())
