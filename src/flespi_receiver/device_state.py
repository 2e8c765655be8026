"""What a stored batch does besides its rows: device_state and one NOTIFY, in its transaction.

The receiver folds each batch per device while it encodes the rows (device_fold.py: so
PostgreSQL never sorts or copies the usual batch for this), then, after the rows and before
the commit, sends one statement: `keep_latest(...)` or `keep_merged(...)`
(schema/0011_device_state_pointer.sql) with one element per device, and `pg_notify` with the
batch's summary. A batch of very many devices is folded by PostgreSQL in that statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from flespi_receiver.config import DatabaseSettings
from flespi_receiver.copy_in import row_count
from flespi_receiver.device_fold import (
    LATEST_OF_TRANSACTION,
    MERGED_OF_MESSAGES,
    MERGED_OF_TRANSACTION,
    DeviceFold,
    state_order,
)
from flespi_receiver.fields import as_datetime
from flespi_receiver.parameter_keys import parameter_keys

__all__ = ["DeviceFold", "parameter_keys", "state_order"]

# The statement a batch ends with, in parts: $1 stream, then the state's arrays, then NOTIFY's.

# keep_batch_latest() and keep_batch_merged() (keep_latest() and keep_merged(), planned at each
# call) read their columns as DeviceFold.latest_arguments and merged_arguments send them
# (schema/0014_..., 0015_...): each one JSON array, but the identities and the parameters'
# digests, one bytea each. asyncpg encodes an array parameter at about a microsecond an
# element, and PostgreSQL making arrays of JSON arrays before the call took 1.8 ms for the four
# columns of 1000 devices (reading them row by row: 0.8).
_JSON, _BYTEA = "::json", "::bytea"


def _call(function: str, types: tuple[str, ...]) -> str:
    """`function($1, ${0}::json, ...)`: {0}, {1}, ... (numbered by str.format) stand for the
    parameters' numbers, each cast to its type."""
    made = (f"${{{number}}}{cast}" for number, cast in enumerate(types))
    return f"{function}($1, {', '.join(made)})"


# idents, times (microseconds since 2000-01-01 UTC), identities, partition times (null: the
# time; NULL: all are)
KEEP_LATEST = _call("keep_batch_latest", (_JSON, _JSON, _BYTEA, _JSON))
# the same four, then the oldest orders, payloads, orders, parameter keys (digests), latitudes,
# their orders, longitudes, their orders
KEEP_MERGED = _call(
    "keep_batch_merged", (_JSON,) * 2 + (_BYTEA,) + (_JSON,) * 4 + (_BYTEA,) + (_JSON,) * 4
)
# the same, for a batch PostgreSQL folds (device_fold.MERGED_OF_TRANSACTION, as f)
KEEP_MERGED_FOLDED = (
    "keep_merged($1, f.idents, f.times, f.hashes, f.partition_times, f.oldest, f.payloads, "
    "f.orders, f.keys, f.latitudes, f.latitude_orders, f.longitudes, f.longitude_orders)"
)
# the same payload the trigger used to send, spelled by PostgreSQL's json_build_object
NOTIFY_BY_ID = (
    "pg_notify(${}, json_build_object('stream', $1::text, 'count', ${}::bigint, "
    "'first_id', ${}::bigint, 'last_id', ${}::bigint, "
    "'xact_id', pg_current_xact_id()::text::numeric)::text)"
)
# after a COPY the ids are not known: the first and the last row of the COPY hold the batch's
# first and last id (the identity is drawn row by row, in order), found by the identity key
NOTIFY_BY_KEY = (
    "pg_notify(${}, json_build_object('stream', $1::text, 'count', ${}::bigint, "
    "'first_id', (SELECT id FROM messages WHERE stream = $1 AND partition_ts = ${} "
    "AND message_hash = ${}), "
    "'last_id', (SELECT id FROM messages WHERE stream = $1 AND partition_ts = ${} "
    "AND message_hash = ${}), 'xact_id', pg_current_xact_id()::text::numeric)::text)"
)


# The view users query, as the migration made it (partitions.py makes it again after turning
# messages into a partitioned table).
DEVICE_STATE_VIEW = """
CREATE VIEW device_state AS
SELECT d.stream, d.ident,
       coalesce(d.message_id, m.id) AS message_id,
       d.ts,
       coalesce(d.received_at, m.received_at) AS received_at,
       -- merge mode keeps the latest known position itself
       CASE WHEN d.payload IS NULL AND d.parameter_orders IS NULL THEN m.latitude
            ELSE d.latitude END AS latitude,
       CASE WHEN d.payload IS NULL AND d.parameter_orders IS NULL THEN m.longitude
            ELSE d.longitude END AS longitude,
       coalesce(d.payload, m.payload) AS payload,
       d.message_hash, d.updated_at
FROM device_latest AS d
LEFT JOIN messages AS m
  ON m.stream = d.stream AND m.partition_ts = d.partition_ts AND m.message_hash = d.message_hash
"""

# Before retention drops a partition: the states that point into it take a copy of what the
# view shows from the message ({partition}: a partition's name, made by the receiver).
KEEP_STATE_OF_DROPPED = """
UPDATE device_latest AS d
SET payload = coalesce(d.payload, m.payload),
    latitude = CASE WHEN d.payload IS NULL AND d.parameter_orders IS NULL THEN m.latitude
                    ELSE d.latitude END,
    longitude = CASE WHEN d.payload IS NULL AND d.parameter_orders IS NULL THEN m.longitude
                     ELSE d.longitude END,
    message_id = m.id, received_at = m.received_at
FROM {partition} AS m
WHERE d.message_id IS NULL
  AND m.stream = d.stream AND m.partition_ts = d.partition_ts AND m.message_hash = d.message_hash
"""


# Merge mode switched off: the states it kept show their latest message again, as latest mode
# keeps them; without this they showed the merged payload and position until the device's next
# later message. A state whose message is gone (retention) keeps what it holds.
# what a state holds besides its pointer, let go: the view shows its latest message
_POINTER_ONLY = """payload = NULL, latitude = NULL, longitude = NULL, message_id = NULL,
    received_at = NULL, parameter_orders = NULL, parameter_keys = NULL, latitude_order = NULL,
    longitude_order = NULL, updated_at = now()"""
LATEST_MODE_STATES = f"""
UPDATE device_latest AS d
SET {_POINTER_ONLY}
WHERE d.parameter_orders IS NOT NULL
  AND EXISTS (SELECT FROM messages AS m
              WHERE m.stream = d.stream AND m.partition_ts = d.partition_ts
                AND m.message_hash = d.message_hash)
"""  # noqa: S608 (only constants go into the text)


# device_state switched back on: messages stored while it was off (no trigger, no fold) may be
# later than a state, or of a device without one. Every device's latest message is looked for
# once, as LATEST_OF_TRANSACTION orders them; a state that moves becomes a latest-mode one.
LATEST_OF_MESSAGES = f"""
INSERT INTO device_latest AS s (stream, ident, ts, message_hash, partition_ts)
SELECT DISTINCT ON (stream, ident) stream, ident, ts, message_hash, partition_ts
FROM messages
WHERE ident IS NOT NULL
ORDER BY stream, ident, ts DESC NULLS LAST, message_hash DESC
ON CONFLICT (stream, ident) DO UPDATE
SET ts = excluded.ts, message_hash = excluded.message_hash,
    partition_ts = excluded.partition_ts, {_POINTER_ONLY}
WHERE is_later(excluded.ts, excluded.message_hash, s.ts, s.message_hash)
"""  # noqa: S608 (only constants go into the text)


CATCH_UP_MERGED = f"SELECT {KEEP_MERGED_FOLDED} FROM ({MERGED_OF_MESSAGES}) AS f"  # noqa: S608


async def catch_up_states(
    conn: asyncpg.Connection | PoolConnectionProxy, merge: bool, off_since: datetime | None
) -> int:
    """After device_state was off (since `off_since`, None if unknown): every device's state
    from the messages stored (LATEST_OF_MESSAGES); how many states were made or moved. Reads
    all of messages once. In merge mode (`merge`), each stream's messages stored since then are
    folded and merged into each state (device_fold.MERGED_OF_MESSAGES, keep_merged()): the
    state keeps the values it held and takes every later one; one more read per stream."""
    if not merge:
        return row_count(await conn.execute(LATEST_OF_MESSAGES))
    changed = 0
    for row in await conn.fetch("SELECT DISTINCT stream FROM messages"):
        changed += await conn.fetchval(CATCH_UP_MERGED, row["stream"], off_since)
    return changed


async def apply_state_mode(
    conn: asyncpg.Connection | PoolConnectionProxy, db: DatabaseSettings
) -> int:
    """In latest mode, turn the states merge mode kept into latest ones (LATEST_MODE_STATES);
    how many. Merge mode needs nothing here: keep_merged() turns a latest state into a merged
    one the first time its device sends a message, starting from that state's message."""
    if not db.device_state or db.device_state_merge:
        return 0
    return row_count(await conn.execute(LATEST_MODE_STATES))


def small_batch_statement(
    effects: BatchEffects, insert: str, fold: DeviceFold, first_parameter: int, also: str = ""
) -> tuple[str, list[Any]]:
    """One statement for a small batch: `insert` (INSERT ... RETURNING id, taking $1 as the
    stream), the device state and the NOTIFY; returns the stored count, first and last id.
    `also`: another data-modifying statement run by the same one (the batch's quarantined
    content), its parameters numbered before `first_parameter`. The added arguments are
    numbered from `first_parameter`."""
    parts = ["count(*)", "min(id)", "max(id)"]
    args: list[Any] = []
    # the rows are inserted by the same statement: the state can't read them, so the batch
    # must be folded here (a small batch has far fewer than KEPT_DEVICES devices)
    assert not fold.in_database
    if effects.device_state and fold.devices:
        arrays = fold.merged_arguments(True) if effects.merge else fold.latest_arguments()
        numbers = range(first_parameter, first_parameter + len(arrays))
        template = KEEP_MERGED if effects.merge else KEEP_LATEST
        parts.append(f"CASE WHEN count(*) > 0 THEN {template.format(*numbers)} END")
        args.extend(arrays)
    if effects.notify_channel:
        parts.append(
            f"CASE WHEN count(*) > 0 THEN pg_notify(${first_parameter + len(args)}, "
            "json_build_object('stream', $1, 'count', count(*), 'first_id', min(id), "
            "'last_id', max(id), 'xact_id', pg_current_xact_id()::text::numeric)::text) END"
        )
        args.append(effects.notify_channel)
    # only constants and numbered parameters go into the text
    # a data-modifying WITH query runs to completion whether or not the query reads it
    queries = f"also AS ({also}), stored AS ({insert})" if also else f"stored AS ({insert})"
    return f"WITH {queries} SELECT {', '.join(parts)} FROM stored", args  # noqa: S608


@dataclass(frozen=True, slots=True)
class BatchEffects:
    """What the configuration asks of every stored batch."""

    device_state: bool = True
    merge: bool = False
    notify_channel: str = "flespi_messages"

    @classmethod
    def from_settings(cls, db: DatabaseSettings) -> BatchEffects:
        return cls(db.device_state, db.device_state_merge, db.notify_channel)

    @property
    def any(self) -> bool:
        return self.device_state or bool(self.notify_channel)


# the default configuration's
DEFAULT_EFFECTS = BatchEffects()

# What the session asks of stored messages, as the receiver's connections say it (app.py)
SESSION_EFFECTS = """
SELECT coalesce(current_setting('flespi_receiver.device_state', true), 'on') = 'on',
       coalesce(current_setting('flespi_receiver.device_state_merge', true), 'off') = 'on',
       coalesce(current_setting('flespi_receiver.notify_channel', true), '')
"""
# in a transaction that keeps device_state itself: the row trigger for others skips its rows
AS_RECEIVER = "SELECT set_config('flespi_receiver.writer', 'receiver', true)"


async def session_effects(conn: asyncpg.Connection | PoolConnectionProxy) -> BatchEffects:
    """The effects the connection's session settings ask for (replay and backfill store with
    the receiver's settings, app.connection_settings)."""
    row = await conn.fetchrow(SESSION_EFFECTS)
    return BatchEffects(*row) if row is not None else DEFAULT_EFFECTS


@dataclass(frozen=True, slots=True)
class Stored:
    """What a batch stored, for its NOTIFY: how many rows, and its first and last row, by id
    when known (INSERT ... RETURNING), else by identity key (partition_ts, message_hash)."""

    count: int
    first: int | tuple[float, bytes]
    last: int | tuple[float, bytes]

    @classmethod
    def copied(cls, fold: DeviceFold) -> Stored:
        """The rows of one COPY: the fold saw them all, in order."""
        assert fold.first is not None
        assert fold.last is not None
        return cls(fold.count, fold.first, fold.last)


def finishing_statement(
    effects: BatchEffects, stream: str, fold: DeviceFold, stored: Stored | None
) -> tuple[str, list[Any]] | None:
    """The statement (and its arguments) that ends a batch's transaction; None: none needed.

    `fold` holds the messages whose device state is kept (folding a message again changes
    nothing, so it may hold some stored before); `stored` what this batch stored.
    """
    parts: list[str] = []
    args: list[Any] = [stream]
    source = ""
    if effects.device_state and fold.in_database:
        # the rows are in this transaction already: PostgreSQL folds them (device_fold.py)
        if effects.merge:
            parts.append(KEEP_MERGED_FOLDED)
            source = f" FROM ({MERGED_OF_TRANSACTION}) AS f"
        else:
            parts.append("keep_latest($1, f.idents, f.times, f.hashes, f.partition_times)")
            source = f" FROM ({LATEST_OF_TRANSACTION}) AS f"
    elif effects.device_state and fold.devices:
        arrays = fold.merged_arguments() if effects.merge else fold.latest_arguments()
        numbers = range(len(args) + 1, len(args) + 1 + len(arrays))
        template = KEEP_MERGED if effects.merge else KEEP_LATEST
        parts.append(template.format(*numbers))
        args.extend(arrays)
    if effects.notify_channel and stored is not None and stored.count:
        start = len(args) + 1
        args.extend([effects.notify_channel, stored.count])
        if isinstance(stored.first, int) and isinstance(stored.last, int):
            parts.append(NOTIFY_BY_ID.format(*range(start, start + 4)))
            args.extend([stored.first, stored.last])
        else:
            assert not isinstance(stored.first, int)
            assert not isinstance(stored.last, int)
            parts.append(NOTIFY_BY_KEY.format(*range(start, start + 6)))
            args.extend(
                [
                    as_datetime(stored.first[0]),
                    stored.first[1],
                    as_datetime(stored.last[0]),
                    stored.last[1],
                ]
            )
    if not parts:
        return None
    return "SELECT " + ", ".join(parts) + source, args
