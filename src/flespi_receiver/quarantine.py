"""Reading `rejected_messages`: listing with filters, one row in full, export as JSON lines.

`raw` holds whatever bytes were sent (invalid UTF-8, NUL, a whole non-JSON body), so it is
never decoded by PostgreSQL here: the bytes come to Python and are shown readably.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

# the first bytes of raw are enough for a one-line preview
PREVIEW_BYTES = 120
FILTER = """
WHERE ($1::text IS NULL OR stream = $1)
  AND ($2::timestamptz IS NULL OR received_at >= $2)
  AND ($3::text IS NULL OR strpos(lower(reason), lower($3)) > 0)
"""
LIST_REJECTED = f"""
SELECT id, stream, received_at, reason, length(raw) AS size,
       substring(raw FROM 1 FOR {PREVIEW_BYTES}) AS head
FROM rejected_messages
{FILTER}
ORDER BY received_at DESC, id DESC
LIMIT $4
"""  # noqa: S608 - constants only, values are parameters
COUNT_REJECTED = f"SELECT count(*) FROM rejected_messages {FILTER}"  # noqa: S608
EXPORT_REJECTED = f"""
SELECT id, stream, received_at, reason, raw, raw_hash
FROM rejected_messages
{FILTER}
ORDER BY id
"""  # noqa: S608
SHOW_REJECTED = """
SELECT id, stream, received_at, reason, raw, raw_hash FROM rejected_messages WHERE id = $1
"""
# C0 controls and DEL, except tab and newline: shown as \\xNN so a terminal is never confused
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_DURATION = re.compile(
    r"(\d+)\s*(s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hour|hours|d|day|days"
    r"|w|week|weeks)"
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class RejectedFilter:
    """Which rows: of one stream, received since a time, with a reason containing a text."""

    stream: str | None = None
    since: datetime | None = None
    reason: str | None = None

    def args(self) -> tuple[str | None, datetime | None, str | None]:
        return (self.stream, self.since, self.reason)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A time: ISO 8601 ("2026-11-01", "2026-11-01T10:00:00+02:00"; UTC when no offset) or a
    duration back from now ("90m", "2h", "7 days"). ValueError otherwise."""
    found = _DURATION.fullmatch(text.strip().lower())
    if found:
        seconds = int(found[1]) * _UNIT_SECONDS[found[2][0]]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a time (2026-11-01, 2026-11-01T10:00:00+02:00) nor a "
            "duration back from now (90m, 2h, 7 days)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def readable(raw: bytes) -> tuple[str, bool]:
    """`raw` as text for a terminal, and whether that text is exactly the bytes.

    Valid UTF-8 is shown as it is; bytes that are not UTF-8 are shown as \\xNN, and so are
    control characters (NUL included) other than tab and newline.
    """
    try:
        text = raw.decode("utf-8")
        exact = True
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="backslashreplace")
        exact = False
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)
    return shown, exact and shown == text


def as_text(raw: bytes) -> str | None:
    """`raw` decoded as UTF-8, or None when it isn't UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def export_record(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """One exported row: raw as base64 (exact) and as text where it decodes as UTF-8."""
    raw = bytes(row["raw"])
    return {
        "id": row["id"],
        "stream": row["stream"],
        "received_at": row["received_at"].isoformat(),
        "reason": row["reason"],
        "size": len(raw),
        "raw_hash": bytes(row["raw_hash"]).hex(),
        "raw_base64": base64.b64encode(raw).decode("ascii"),
        "text": as_text(raw),
    }


async def list_rejected(
    conn: asyncpg.Connection, where: RejectedFilter, limit: int
) -> list[dict[str, Any]]:
    """Newest first: id, stream, received_at, reason, size (bytes) and a readable preview."""
    rows = await conn.fetch(LIST_REJECTED, *where.args(), limit)
    return [
        {
            "id": row["id"],
            "stream": row["stream"],
            "received_at": row["received_at"],
            "reason": row["reason"],
            "size": row["size"],
            "preview": preview(bytes(row["head"]), truncated=row["size"] > PREVIEW_BYTES),
        }
        for row in rows
    ]


def preview(head: bytes, *, truncated: bool) -> str:
    """The first bytes of raw on one line, readable (see `readable`); … when cut."""
    if truncated:
        # a multi-byte character cut by the preview is not a reason to show bytes
        for cut in range(1, 4):
            if as_text(head) is not None:
                break
            if as_text(head[:-cut]) is not None:
                head = head[:-cut]
                break
    shown, _ = readable(head)
    one_line = shown.replace("\n", "\\n").replace("\t", "\\t")
    return one_line + ("…" if truncated else "")


async def count_rejected(conn: asyncpg.Connection, where: RejectedFilter) -> int:
    return int(await conn.fetchval(COUNT_REJECTED, *where.args()))


async def get_rejected(conn: asyncpg.Connection, rejected_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(SHOW_REJECTED, rejected_id)


async def export_rejected(
    conn: asyncpg.Connection, where: RejectedFilter
) -> AsyncIterator[dict[str, Any]]:
    """Every matching row, oldest first, read through a cursor (any size of quarantine)."""
    async with conn.transaction(readonly=True):
        async for row in conn.cursor(EXPORT_REJECTED, *where.args(), prefetch=500):
            yield export_record(row)
