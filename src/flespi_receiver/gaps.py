"""Gaps: stretches of device time in which a stream stored no message while its devices report.

A receiver or database that was down longer than the stream's queue_ttl leaves such a
stretch; `flespi-receiver backfill` over it fetches what flespi still keeps. Time here is
the messages' own `timestamp` (partition_ts), the time flespi's REST API selects by.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta

from flespi_receiver.copy_in import Connection

# How many devices (distinct idents; messages without one count as one) each stream heard from
# in each bucket of device time; the time before `since` and messages dated in the future (a
# device with a wrong clock) are left out.
DEVICES_PER_BUCKET = """
SELECT stream, date_bin($3::interval, partition_ts, $2::timestamptz) AS bucket,
       count(DISTINCT coalesce(ident, '')) AS devices
FROM messages
WHERE partition_ts >= $2::timestamptz AND partition_ts <= $4::timestamptz
  AND ($1::text IS NULL OR stream = $1)
GROUP BY stream, bucket
ORDER BY stream, bucket
"""
LAST_BEFORE = """
SELECT max(partition_ts) FROM messages
WHERE stream = $1 AND partition_ts < $2::timestamptz AND partition_ts >= $3::timestamptz
"""
FIRST_FROM = """
SELECT min(partition_ts) FROM messages
WHERE stream = $1 AND partition_ts >= $2::timestamptz AND partition_ts <= $3::timestamptz
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
    device reported (within `context` before and after it), oldest first per stream.

    A stretch counts as silent when fewer than half of the devices a stream usually hears
    from (the median over buckets of min_gap / 4 that heard any) reported in it: a tracker
    uploading its buffered history during an outage does not hide the outage of the others.
    The gap runs from the stream's last message before the stretch to its first after it.
    """
    bucket = max(min_gap / 4, timedelta(minutes=1))
    counts: dict[str, dict[datetime, int]] = {}
    for row in await conn.fetch(DEVICES_PER_BUCKET, stream, since, bucket, now):
        counts.setdefault(row["stream"], {})[row["bucket"]] = row["devices"]
    gaps = []
    for name, heard in counts.items():
        usual = statistics.median(heard.values())
        for quiet_from, quiet_to in _quiet_stretches(heard, usual / 2, since, now, bucket):
            gap = await _gap(conn, name, quiet_from, quiet_to, since, now, context)
            if gap is not None and gap.length >= min_gap:
                gaps.append(gap)
    return gaps


def _quiet_stretches(
    heard: dict[datetime, int], below: float, since: datetime, now: datetime, bucket: timedelta
) -> list[tuple[datetime, datetime]]:
    """Runs of buckets with fewer than `below` devices: (start of the first, end of the last,
    or `now`)."""
    stretches: list[tuple[datetime, datetime]] = []
    start: datetime | None = None
    moment = since
    while moment <= now:
        if heard.get(moment, 0) < below:
            start = moment if start is None else start
        elif start is not None:
            stretches.append((start, moment))
            start = None
        moment += bucket
    if start is not None:
        stretches.append((start, now))
    return stretches


async def _gap(
    conn: Connection,
    stream: str,
    quiet_from: datetime,
    quiet_to: datetime,
    since: datetime,
    now: datetime,
    context: timedelta,
) -> Gap | None:
    """The gap a quiet stretch makes, or None when no device reported before it (and, unless
    it lasts until now, after it)."""
    start = await conn.fetchval(LAST_BEFORE, stream, quiet_from, since)
    if start is None:
        return None
    end = await conn.fetchval(FIRST_FROM, stream, quiet_to, now) if quiet_to < now else None
    if end is None:
        devices = await conn.fetchval(DEVICES_BEFORE, stream, start, context)
        return Gap(stream, start, now, devices, True) if devices else None
    devices = await conn.fetchval(DEVICES_AROUND, stream, start, end, context)
    return Gap(stream, start, end, devices, False) if devices else None
