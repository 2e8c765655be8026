"""What the other receivers on one database run with in `[partitioning]`, to catch disagreement.

Every connection of a running receiver holds a shared session advisory lock whose two keys say
its schema and its `[partitioning]`: `pg_locks` then shows what each live receiver runs with,
and the lock goes away with the connection, so a stopped receiver never counts. Nothing is
written to any table.
"""

from __future__ import annotations

from dataclasses import dataclass

from flespi_receiver.config import PartitioningSettings
from flespi_receiver.copy_in import Connection

INTERVALS = ("none", "day", "week", "month")
# retention in hours shares the second key with the interval: 28 bits, about 30 000 years
RETENTION_BITS = 28
KEEP_ALL = (1 << RETENTION_BITS) - 1
HOURS = {"day": 24, "week": 7 * 24, "month": 30 * 24, "year": 365 * 24}

# the first key: the schema (several schemas on one database are separate installations)
SCHEMA_KEY = "hashtext('flespi_receiver:partitioning:' || current_schema())"
ANNOUNCE = f"SELECT pg_advisory_lock_shared({SCHEMA_KEY}, $1)"
# pg_locks shows a two-key advisory lock as classid, objid (unsigned) and objsubid = 2
PEERS = """
SELECT l.pid, l.objid::text::bigint AS key
FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = (hashtext('flespi_receiver:partitioning:' || current_schema())::bigint
                   & 4294967295)::text::oid
  AND l.pid <> pg_backend_pid()
"""


@dataclass(frozen=True)
class Peer:
    """A connection of another live receiver, and the `[partitioning]` it runs with."""

    pid: int
    interval: str
    retention_hours: int  # KEEP_ALL: keeps everything

    @property
    def retention(self) -> str:
        return "keep all" if self.retention_hours == KEEP_ALL else f"{self.retention_hours} hours"


def retention_hours(settings: PartitioningSettings) -> int:
    """The retention in hours (months as 30 days, years as 365), KEEP_ALL for none."""
    if not settings.retention:
        return KEEP_ALL
    count, unit = settings.retention.split()
    return min(int(count) * HOURS[unit.rstrip("s")], KEEP_ALL - 1)


def settings_key(settings: PartitioningSettings) -> int:
    return INTERVALS.index(settings.interval) << RETENTION_BITS | retention_hours(settings)


async def announce(conn: Connection, settings: PartitioningSettings) -> None:
    """Say, for as long as this connection lives, what `[partitioning]` this receiver has."""
    await conn.execute(ANNOUNCE, settings_key(settings))


async def live_peers(conn: Connection) -> list[Peer]:
    """The other live receivers' connections on this database and schema (one per pid)."""
    found = []
    for row in await conn.fetch(PEERS):
        key = int(row["key"])
        interval = INTERVALS[min(key >> RETENTION_BITS, len(INTERVALS) - 1)]
        found.append(Peer(int(row["pid"]), interval, key & KEEP_ALL))
    return found


def other_intervals(settings: PartitioningSettings, peers: list[Peer]) -> list[Peer]:
    """Live receivers that partition by another interval (none counts as one)."""
    return [p for p in peers if p.interval != settings.interval]


def other_retentions(settings: PartitioningSettings, peers: list[Peer]) -> list[Peer]:
    own = retention_hours(settings)
    return [p for p in peers if p.retention_hours != own]


def describe(peers: list[Peer]) -> str:
    """For messages: `interval "month", retention 2160 hours (PostgreSQL backend pids 1, 2)`."""
    by_setting: dict[tuple[str, str], list[int]] = {}
    for p in peers:
        by_setting.setdefault((p.interval, p.retention), []).append(p.pid)
    return "; ".join(
        f'interval "{interval}", retention {retention} '
        f"(PostgreSQL backend pids {', '.join(map(str, sorted(pids)))})"
        for (interval, retention), pids in sorted(by_setting.items())
    )
