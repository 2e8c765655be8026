"""Gaps: stretches of device time in which a stream stored no message while its devices report.

A receiver or database that was down longer than the stream's queue_ttl leaves such a
stretch; `flespi-receiver backfill` over it fetches what flespi still keeps. Time here is
the messages' own `timestamp` (partition_ts), the time flespi's REST API selects by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from flespi_receiver.store import Connection

# With a stream named, served by the (stream, partition_ts) prefix of the unique index. Messages
# dated in the future (a device with a wrong clock) are left out, so is the time before `since`.
STREAM_GAPS = """
SELECT stream, gap_from, gap_to
FROM (SELECT stream, partition_ts AS gap_to,
             lag(partition_ts) OVER (PARTITION BY stream ORDER BY partition_ts) AS gap_from
      FROM messages
      WHERE partition_ts >= $2::timestamptz AND partition_ts <= $4::timestamptz
        AND ($1::text IS NULL OR stream = $1)) AS t
WHERE gap_to - gap_from >= $3::interval
UNION ALL
-- a stream silent from its last message until now
SELECT stream, max(partition_ts), $4::timestamptz
FROM messages
WHERE partition_ts >= $2 AND partition_ts <= $4 AND ($1::text IS NULL OR stream = $1)
GROUP BY stream
HAVING $4::timestamptz - max(partition_ts) >= $3::interval
ORDER BY stream, gap_from
"""
# devices that reported in the `context` before a gap and again in the `context` after it
DEVICES_AROUND = """
SELECT count(*) FROM (
    SELECT ident FROM messages
    WHERE stream = $1 AND ident IS NOT NULL
      AND partition_ts >= $2::timestamptz - $4::interval AND partition_ts <= $2
    INTERSECT
    SELECT ident FROM messages
    WHERE stream = $1 AND ident IS NOT NULL
      AND partition_ts >= $3::timestamptz AND partition_ts <= $3 + $4::interval
) AS reporting
"""
DEVICES_BEFORE = """
SELECT count(DISTINCT ident) FROM messages
WHERE stream = $1 AND ident IS NOT NULL
  AND partition_ts >= $2::timestamptz - $3::interval AND partition_ts <= $2
"""


@dataclass(frozen=True, slots=True)
class Gap:
    """No message of `stream` with a device time strictly between `start` and `end`."""

    stream: str
    start: datetime
    end: datetime
    devices: int  # devices that reported just before and (unless `open`) just after
    open: bool  # nothing since `start`, up to now

    @property
    def length(self) -> timedelta:
        return self.end - self.start

    def backfill_command(self) -> str:
        """The command that fetches the gap (whole seconds, widened: the ends are stored)."""
        return (
            f"flespi-receiver backfill --stream {self.stream} --devices all "
            f"--from {math.floor(self.start.timestamp())} --to {math.ceil(self.end.timestamp())}"
        )


async def find_gaps(
    conn: Connection,
    *,
    now: datetime,
    since: datetime,
    min_gap: timedelta,
    stream: str | None = None,
    context: timedelta = timedelta(days=1),
) -> list[Gap]:
    """Every gap of at least `min_gap` between `since` and `now` around which at least one
    device reported (within `context` before and after it), oldest first per stream."""
    gaps = []
    for row in await conn.fetch(STREAM_GAPS, stream, since, min_gap, now):
        is_open = row["gap_to"] == now
        if is_open:
            devices = await conn.fetchval(DEVICES_BEFORE, row["stream"], row["gap_from"], context)
        else:
            devices = await conn.fetchval(
                DEVICES_AROUND, row["stream"], row["gap_from"], row["gap_to"], context
            )
        if devices:
            gaps.append(Gap(row["stream"], row["gap_from"], row["gap_to"], devices, is_open))
    return gaps
