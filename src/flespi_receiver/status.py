"""What `flespi-receiver status` reports: per stream counts and the database's state."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from flespi_receiver.config import Settings, mask_url
from flespi_receiver.migrate import migrations, pending_migrations
from flespi_receiver.trigger import TRIGGER_EXISTS

# one pass over messages; count(DISTINCT ident) reads every row, fine for an operator's look
STREAM_COUNTS = """
SELECT stream,
       count(*) AS stored,
       count(*) FILTER (WHERE received_at > now() - interval '1 hour') AS last_hour,
       max(received_at) AS last_commit,
       count(DISTINCT ident) AS devices
FROM messages
GROUP BY stream
"""
REJECTED_COUNTS = "SELECT stream, count(*) AS rejected FROM rejected_messages GROUP BY stream"
SERVER = """
SELECT current_database() AS name,
       current_setting('server_version') AS server_version,
       pg_database_size(current_database()) AS size_bytes
"""
SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM schema_migrations"


@dataclass(frozen=True)
class StreamStatus:
    """One stream: messages stored (all, and in the last hour), its last commit, and more."""

    name: str
    configured: bool  # false: rows of a stream no longer in the configuration
    stored: int = 0
    last_hour: int = 0
    last_commit: datetime | None = None
    rejected: int = 0
    devices: int = 0  # distinct idents


@dataclass(frozen=True)
class DatabaseStatus:
    url: str  # password masked
    embedded: bool
    name: str
    server_version: str
    size_bytes: int
    schema: str
    schema_version: int  # highest applied migration
    latest_version: int  # highest migration this receiver ships
    pending_migrations: list[str]
    trigger: bool  # messages_keep_device_state exists (device_state for other sessions)


@dataclass(frozen=True)
class Status:
    database: DatabaseStatus
    streams: list[StreamStatus] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """Plain data; times as ISO 8601 strings."""
        data = asdict(self)
        for stream in data["streams"]:
            when = stream["last_commit"]
            stream["last_commit"] = when.isoformat() if when else None
        return data


async def collect_status(conn: asyncpg.Connection, settings: Settings, url: str) -> Status:
    """Read the status over `conn`, a connection whose search_path is the receiver's schema."""
    schema = settings.database.schema_name
    pending = await pending_migrations(conn, schema)
    server = await conn.fetchrow(SERVER)
    assert server is not None  # one row, always
    tables_exist = not any(m.version == 1 for m in pending)
    version = int(await conn.fetchval(SCHEMA_VERSION)) if tables_exist else 0
    database = DatabaseStatus(
        url=mask_url(url),
        embedded=not settings.database.url.get_secret_value(),
        name=server["name"],
        server_version=server["server_version"],
        size_bytes=int(server["size_bytes"]),
        schema=schema,
        schema_version=version,
        latest_version=migrations()[-1].version,
        pending_migrations=[f"{m.version:04d}_{m.name}" for m in pending],
        trigger=bool(await conn.fetchval(TRIGGER_EXISTS)) if tables_exist else False,
    )
    counts: dict[str, dict[str, Any]] = {s.name: {} for s in settings.streams}
    if tables_exist:
        for row in await conn.fetch(STREAM_COUNTS):
            counts.setdefault(row["stream"], {}).update(dict(row))
        for row in await conn.fetch(REJECTED_COUNTS):
            counts.setdefault(row["stream"], {})["rejected"] = row["rejected"]
    configured = {s.name for s in settings.streams}
    streams = [
        StreamStatus(
            name=name,
            configured=name in configured,
            **{k: v for k, v in found.items() if k != "stream"},
        )
        for name, found in counts.items()
    ]
    return Status(database, streams)


def _size(size_bytes: int) -> str:
    size = float(size_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def render_status(status: Status) -> str:
    """The status as text for a terminal."""
    db = status.database
    if db.pending_migrations:
        version = f"{db.schema_version}, pending: {', '.join(db.pending_migrations)}"
    else:
        version = f"{db.schema_version} (current)"
    lines = [
        f"database  {db.url}{' (embedded)' if db.embedded else ''}",
        f"server    PostgreSQL {db.server_version}, database {db.name}, {_size(db.size_bytes)}",
        f"schema    {db.schema}, version {version}",
        f"trigger   {'on' if db.trigger else 'off'} (device_state for other sessions' inserts)",
        "",
    ]
    header = ("stream", "stored", "last hour", "last commit (UTC)", "rejected", "devices")
    rows = [header] + [
        (
            s.name + ("" if s.configured else " (not configured)"),
            str(s.stored),
            str(s.last_hour),
            s.last_commit.strftime("%Y-%m-%d %H:%M:%S") if s.last_commit else "never",
            str(s.rejected),
            str(s.devices),
        )
        for s in status.streams
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
