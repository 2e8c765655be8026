"""Backfill: device messages read from flespi's REST API, stored as the stream stores them.

Device by device, page by page: each page is decoded as a stream batch is (decode_batch),
stored with the stream's identity, which must be by content (so a message the stream
delivered, however flespi spelled it there, is skipped, and one the stream delivers later is
skipped then; identity.py), and committed
together with the position reached in `backfill_progress`. Killed at any moment, the next
run of the same range resumes from the last committed page; a finished range is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from flespi_receiver.copy_in import Connection
from flespi_receiver.device_state import AS_RECEIVER, session_effects
from flespi_receiver.errors import ConfigError
from flespi_receiver.fields import MessageFields, names_in
from flespi_receiver.flespi_api import FlespiApi
from flespi_receiver.messages import Message, Rejected, decode_batch
from flespi_receiver.migrate import pending_migrations
from flespi_receiver.rejected_store import store_rejected
from flespi_receiver.store import chunk_transaction, store_decoded

PAGE_SIZE = 1000
STREAM_IDENTITY = "SELECT identity, finished_at FROM stream_identity WHERE stream = $1"
HAS_ROWS = "SELECT EXISTS (SELECT FROM messages WHERE stream = $1)"
# a page full of messages with one timestamp can't move `from` on: ask for more, up to this
MAX_PAGE_SIZE = 100_000

START_DEVICE = """
INSERT INTO backfill_progress (stream, device_id, range_from, range_to, next_from)
VALUES ($1, $2, $3, $4, extract(epoch FROM $3::timestamptz))
ON CONFLICT (stream, device_id, range_from, range_to) DO NOTHING
"""
READ_DEVICE = """
SELECT next_from, done FROM backfill_progress
WHERE stream = $1 AND device_id = $2 AND range_from = $3 AND range_to = $4
"""
# two backfills of one range take turns page by page (each still skips what the other stored)
LOCK_DEVICE = READ_DEVICE + "FOR UPDATE"
ADVANCE_DEVICE = """
UPDATE backfill_progress
SET next_from = greatest(next_from, $5), done = done OR $6, pages = pages + 1,
    fetched = fetched + $7, stored = stored + $8, rejected = rejected + $9, updated_at = now()
WHERE stream = $1 AND device_id = $2 AND range_from = $3 AND range_to = $4
"""


@dataclass(frozen=True, slots=True)
class BackfillRange:
    """What to fetch: the devices `selector` names, device time from `start` to `end`
    (both inclusive), stored as messages of `stream`."""

    stream: str
    selector: str
    start: datetime
    end: datetime


@dataclass(slots=True)
class BackfillSummary:
    """Counts so far; `position` is how far through the range the current device is (0..1).
    A message flespi sends twice (the last of a page is the first of the next) counts once."""

    devices: int = 0
    devices_done: int = 0
    pages: int = 0
    fetched: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    skipped_devices: int = 0  # finished by an earlier run
    position: float = 0.0
    started: float = 0.0
    dry_run: bool = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def seconds_left(self) -> float | None:
        """Estimated from the share of the range done so far; None before the first page."""
        if not self.devices:
            return None
        share = min(1.0, (self.devices_done + self.position) / self.devices)
        if share <= 0:
            return None
        return self.elapsed() * (1 - share) / share

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "devices": self.devices,
            "devices_already_done": self.skipped_devices,
            "pages": self.pages,
            "fetched": self.fetched,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
        }


Progress = Callable[[BackfillSummary], None]


def require_content_identity(stream: str, fields: MessageFields) -> None:
    """ConfigError unless the stream keys its messages by content and reads flespi's own
    parameter names (the REST API writes those, not a stream's convert_message renames)."""
    if not fields.content_identity:
        raise ConfigError(
            f"stream {stream!r} keys its messages by their text, and flespi's REST API "
            'spells them otherwise than the stream: set identity = "content" in its '
            "[[streams]] section and restart its receivers first (docs/recovery.md)"
        )
    if fields.names != names_in("dotted"):
        raise ConfigError(
            f"stream {stream!r} reads renamed parameters ([streams.fields]), but flespi's REST "
            "API writes flespi's own names: its messages would be other messages, with empty "
            "derived columns; backfill only streams without convert_message renames"
        )


async def require_keyed_by_content(conn: Connection, schema: str, stream: str) -> None:
    """ConfigError unless the database is migrated and the stream's rows are all keyed by
    content already (or it has none): what a dry run needs, since it changes nothing."""
    if await pending_migrations(conn, schema):
        raise ConfigError(
            "the database's schema is not up to date: run `flespi-receiver migrate` first "
            "(a dry run changes nothing)"
        )
    state = await conn.fetchrow(STREAM_IDENTITY, stream)
    if state is not None and state["identity"] == "content" and state["finished_at"]:
        return
    if await conn.fetchval(HAS_ROWS, stream):
        raise ConfigError(
            f"stream {stream!r} has rows not keyed by content yet: `flespi-receiver migrate` "
            "re-keys them (stop the stream's receivers first, docs/recovery.md); a dry run "
            "changes nothing"
        )


async def backfill(
    conn: Connection,
    api: FlespiApi,
    target: BackfillRange,
    fields: MessageFields,
    *,
    page_size: int = PAGE_SIZE,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> BackfillSummary:
    """Fetch and store every message of the selected devices in the range. `conn` has the
    receiver's session settings (app.connection_settings); `fields` is how the stream reads
    its messages (StreamSettings.message_fields): it must key them by content, else
    ConfigError. A dry run stores each page and rolls it back, so it counts what a real run
    would store, and records no progress."""
    require_content_identity(target.stream, fields)
    summary = BackfillSummary(dry_run=dry_run, started=time.monotonic())
    device_ids = await api.device_ids(target.selector)
    summary.devices = len(device_ids)
    for device_id in device_ids:
        summary.position = 0.0
        await _backfill_device(conn, api, target, device_id, page_size, summary, progress, fields)
        summary.devices_done += 1
        summary.position = 0.0
        if progress is not None:
            progress(summary)
    return summary


async def _backfill_device(
    conn: Connection,
    api: FlespiApi,
    target: BackfillRange,
    device_id: int,
    page_size: int,
    summary: BackfillSummary,
    progress: Progress | None,
    fields: MessageFields,
) -> None:
    key = (target.stream, device_id, target.start, target.end)
    start, end = target.start.timestamp(), target.end.timestamp()
    if not summary.dry_run:
        await conn.execute(START_DEVICE, *key)
    position = await conn.fetchrow(READ_DEVICE, *key)
    if position is not None and position["done"]:
        summary.skipped_devices += 1
        return
    next_from = position["next_from"] if position is not None else start
    count = page_size
    previous: set[bytes] = set()  # identities of the page before
    while True:
        page = decode_batch(await api.device_messages(device_id, next_from, end, count), fields)
        times = [m.columns[1] for m in page.messages]  # ts: the device time, Unix seconds
        last = max((t for t in times if t is not None), default=None)
        full = page.size >= count
        if full and (last is None or last <= next_from):
            # a full page of messages at one instant: `from` can't move on; a bigger page
            if count >= MAX_PAGE_SIZE:
                raise RuntimeError(f"device {device_id}: over {count} messages at {next_from}")
            count = min(count * 4, MAX_PAGE_SIZE)
            continue
        # `from` is inclusive: the messages at the previous page's last instant come again
        fresh = [m for m in page.messages if m.identity not in previous]
        previous = {m.identity for m in page.messages}
        done = not full
        reached = end if done or last is None else last
        stored, rejected = await _store_page(
            conn, target.stream, fresh, page.rejected, key, reached, done, summary.dry_run
        )
        fetched = len(fresh) + len(page.rejected) + page.repeated
        summary.pages += 1
        summary.fetched += fetched
        summary.stored += stored
        summary.rejected += rejected
        summary.duplicates += fetched - stored - rejected
        summary.position = (reached - start) / (end - start) if end > start else 1.0
        if progress is not None:
            progress(summary)
        if done:
            return
        next_from, count = reached, page_size


async def _store_page(
    conn: Connection,
    stream: str,
    messages: list[Message],
    rejected: list[Rejected],
    key: tuple[object, ...],
    reached: float,
    done: bool,
    dry_run: bool,
) -> tuple[int, int]:
    """One page and the position it reaches, in one transaction; (stored, rejected)."""
    async with chunk_transaction(conn, dry_run=dry_run):
        if not dry_run:
            await conn.fetchrow(LOCK_DEVICE, *key)
        # the page keeps device_state and sends its NOTIFY itself, as the session says
        await conn.execute(AS_RECEIVER)
        effects = await session_effects(conn)
        refused: list[Rejected] = []
        stored = await store_decoded(conn, stream, messages, refused, effects) if messages else 0
        kept = rejected + refused
        if kept:
            await store_rejected(conn, stream, kept)
        if not dry_run:
            fetched = len(messages) + len(rejected)
            await conn.execute(ADVANCE_DEVICE, *key, reached, done, fetched, stored, len(kept))
    return stored, len(kept)
