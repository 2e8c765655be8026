"""Time partitioning of `messages` by `partition_ts`: partitions made ahead, old ones dropped.

Native declarative partitioning, by day, week or month. A default partition takes what no
partition covers (devices with a wrong clock, messages without time); when a partition is
made later, the rows of its range move out of the default partition first. Retention drops
whole partitions, never rows one by one. Every step runs beside writers: it takes the locks it
needs before it looks at anything, waits for them only briefly, and tries again (ddl.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog

from flespi_receiver.config import PartitioningSettings
from flespi_receiver.copy_in import Connection
from flespi_receiver.ddl import LocksBusy, with_short_locks
from flespi_receiver.device_state import DEVICE_STATE_VIEW, KEEP_STATE_OF_DROPPED
from flespi_receiver.errors import ConfigError
from flespi_receiver.partition_peers import (
    KEEP_ALL,
    Peer,
    describe,
    live_peers,
    other_intervals,
    other_retentions,
    retention_hours,
)
from flespi_receiver.trigger import CREATE_TRIGGER

log = structlog.get_logger("flespi_receiver.partitions")

LOCK = "SELECT pg_advisory_xact_lock(hashtext('flespi_receiver:partitions:' || current_schema()))"
IS_PARTITIONED = """
SELECT c.relkind = 'p' FROM pg_class c
WHERE c.oid = to_regclass(current_schema() || '.messages')
"""
# The bounds as values: the text pg_get_expr() gives is read back by PostgreSQL itself, in the
# same session, so no DateStyle or TimeZone can make it mean another time.
PARTITIONS = r"""
SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT' AS is_default,
       b[1]::timestamptz AS starts, b[2]::timestamptz AS ends
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
LEFT JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                               'FROM \(''([^'']+)''\) TO \(''([^'']+)''\)') AS b ON true
WHERE i.inhparent = to_regclass(current_schema() || '.messages')
"""
DEFAULT_PARTITION = "messages_default"
# month arithmetic in UTC, whatever the session's TimeZone
RETENTION_LIMIT = (
    "SELECT ($1::timestamptz AT TIME ZONE 'UTC' - $2::text::interval) AT TIME ZONE 'UTC'"
)
# seconds a start waits for locks before it gives up; the hourly upkeep is more patient
START_PATIENCE = 30.0
UPKEEP_PATIENCE = 120.0

# A fresh, empty, plain messages table becomes a partitioned one with the same columns,
# indexes and trigger.
CONVERT = f"""
CREATE TABLE messages_partitioned (LIKE messages INCLUDING ALL) PARTITION BY RANGE (partition_ts);
DROP VIEW IF EXISTS messages_typed;
DROP VIEW device_state;
DROP TABLE messages;
ALTER TABLE messages_partitioned RENAME TO messages;
CREATE TABLE messages_default PARTITION OF messages DEFAULT;
{DEVICE_STATE_VIEW};
{CREATE_TRIGGER};
"""


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime

    @property
    def name(self) -> str:
        return f"messages_p{self.start:%Y%m%d}"


@dataclass(frozen=True)
class Partition:
    """A partition of messages as the catalog has it; bounds None where open or DEFAULT."""

    name: str
    is_default: bool
    starts: datetime | None
    ends: datetime | None

    def overlaps(self, period: Period) -> bool:
        if self.is_default:
            return False
        starts = self.starts or datetime.min.replace(tzinfo=UTC)
        ends = self.ends or datetime.max.replace(tzinfo=UTC)
        return starts < period.end and period.start < ends


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


async def partitions(conn: Connection) -> list[Partition]:
    return [Partition(*row) for row in await conn.fetch(PARTITIONS)]


def _disagreement(settings: PartitioningSettings, peers: list[Peer]) -> str:
    return (
        f'receivers on this database disagree on [partitioning]: this one has interval = "'
        f'{settings.interval}", retention = "{settings.retention}"; running ones have '
        f"{describe(peers)}. Give every receiver that shares the database the same [partitioning]"
    )


async def ensure_partitioned(conn: Connection, settings: PartitioningSettings) -> None:
    """Turn the plain messages table into a partitioned one, if configured and still empty.

    Raises ConfigError (the receiver must not start) when messages already holds rows or is
    being written to for longer than START_PATIENCE, and when a running receiver partitions
    by another interval. Rows are never dropped: the emptiness is checked under the lock.
    """
    peers = await live_peers(conn)
    conflicting = [p for p in other_intervals(settings, peers) if p.interval != "none"]
    if conflicting and settings.interval != "none":
        raise ConfigError(_disagreement(settings, conflicting))
    if other_intervals(settings, peers) or other_retentions(settings, peers):
        log.warning("partitioning disagreement", detail=_disagreement(settings, peers))
    if settings.interval == "none":
        if await conn.fetchval(IS_PARTITIONED):
            log.warning(
                "messages is partitioned but partitioning.interval is none: this receiver makes "
                "no partitions; unless another one does, new messages go to messages_default"
            )
        return

    async def convert() -> bool:
        await conn.execute(LOCK)
        if await conn.fetchval(IS_PARTITIONED):
            return False
        # before deciding anything: wait for every batch being written, and keep new ones out
        await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM messages)"):
            raise ConfigError(
                "partitioning.interval is set but messages is a plain table that already holds "
                'messages; convert it as docs/scaling.md describes, or set interval = "none"'
            )
        await conn.execute(CONVERT)
        return True

    try:
        converted = await with_short_locks(
            conn, convert, what="converting messages to partitions", patience=START_PATIENCE
        )
    except LocksBusy as exc:
        raise ConfigError(
            f"partitioning.interval is set but messages could not be converted ({exc}): "
            "other receivers are writing to it. Stop them, or start this one with the same "
            "[partitioning] as theirs"
        ) from None
    if converted:
        log.info("messages is now partitioned", interval=settings.interval)


async def maintain(
    conn: Connection,
    settings: PartitioningSettings,
    now: datetime | None = None,
    *,
    patience: float = START_PATIENCE,
) -> bool:
    """Create the partitions around `now` and drop those past retention; True when done.

    False (logged) when it could not be done now, with the cause; then the rows of periods
    without a partition go to the default partition, stored all the same, and the next upkeep
    tries again. Never raises for the database or its locks.
    """
    if settings.interval == "none":
        return True
    now = now or datetime.now(UTC)
    try:
        if not await conn.fetchval(IS_PARTITIONED):
            return True
        peers = await live_peers(conn)
        if other_intervals(settings, peers):
            log.error("partitioning disagreement", detail=_disagreement(settings, peers))
        for period in periods_around(now, settings.interval, settings.ahead):

            async def create(period: Period = period) -> None:
                await _create(conn, period)

            await with_short_locks(conn, create, what=f"making {period.name}", patience=patience)
        if settings.retention:
            retention = _longest_retention(settings, peers)
            if retention is not None:

                async def drop(retention: str = retention) -> None:
                    await _drop_older_than(conn, now, retention)

                await with_short_locks(conn, drop, what="retention", patience=patience)
    except (LocksBusy, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        log.warning(
            "partition upkeep not done now; it is tried again, and meanwhile rows without a "
            "partition are stored in messages_default",
            error=f"{type(exc).__name__}: {exc}",
        )
        return False
    return True


def _longest_retention(settings: PartitioningSettings, peers: list[Peer]) -> str | None:
    """The retention to apply: this receiver's, or a longer one another live receiver has
    (so that disagreeing receivers never drop what one of them keeps); None keeps all."""
    own = retention_hours(settings)
    longer = [p for p in other_retentions(settings, peers) if p.retention_hours > own]
    if not longer:
        return settings.retention
    log.warning("partitioning disagreement", detail=_disagreement(settings, longer))
    hours = max(p.retention_hours for p in longer)
    return None if hours == KEEP_ALL else f"{hours} hours"


async def _create(conn: Connection, period: Period) -> None:
    await conn.execute(LOCK)
    found = await partitions(conn)
    if any(p.name == period.name for p in found):
        return
    overlapping = [p.name for p in found if p.overlaps(period)]
    if overlapping:
        log.error(
            "partition not made: its range is already partitioned otherwise (receivers "
            "disagree on partitioning.interval?)",
            partition=period.name,
            overlapping=overlapping,
        )
        return
    name = period.name  # built from a date only: safe as an identifier
    has_default = any(p.is_default for p in found)
    # the locks first, in the order ATTACH takes them: no batch writes into the default
    # partition while its rows for this period move, so none can be missed
    await conn.execute("LOCK TABLE messages IN SHARE UPDATE EXCLUSIVE MODE")
    if has_default:
        await conn.execute(f"LOCK TABLE {DEFAULT_PARTITION} IN ACCESS EXCLUSIVE MODE")
    await conn.execute(f"CREATE TABLE {name} (LIKE messages INCLUDING DEFAULTS)")
    moved = "0"
    if has_default:
        # rows that waited in the default partition for this period move in first
        status = await conn.execute(
            # the names are constants and dates, never user input
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} "  # noqa: S608
            "WHERE partition_ts >= $1 AND partition_ts < $2 RETURNING *) "
            f"INSERT INTO {name} SELECT * FROM moved",
            period.start,
            period.end,
        )
        moved = status.split()[-1]
    await conn.execute(
        f"ALTER TABLE messages ATTACH PARTITION {name} FOR VALUES FROM "
        f"('{period.start.isoformat()}') TO ('{period.end.isoformat()}')"
    )
    log.info("partition created", partition=name, moved_from_default=int(moved))


async def _drop_older_than(conn: Connection, now: datetime, retention: str) -> None:
    await conn.execute(LOCK)
    limit = await conn.fetchval(RETENTION_LIMIT, now, retention)
    old = [p for p in await partitions(conn) if not p.is_default and p.ends and p.ends <= limit]
    if not old:
        return
    # dropping a partition locks the whole table: take it first, briefly, then drop them all
    await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
    for partition in sorted(old, key=lambda p: p.name):
        # device_state keeps its own copy of a latest message that goes
        await conn.execute(KEEP_STATE_OF_DROPPED.format(partition=f'"{partition.name}"'))
        await conn.execute(f'DROP TABLE "{partition.name}"')
        log.info(
            "partition dropped by retention", partition=partition.name, ended=str(partition.ends)
        )
