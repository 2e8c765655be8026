"""Replaying the quarantine: rejected content through the stream's decoding and storing again.

Rows are taken in chunks, in the order of `rejected_messages`' primary key, each chunk in one
transaction: its rows are locked (`FOR UPDATE SKIP LOCKED`, so a second replay or a receiver
never waits on them and never gets them twice), decoded as the stream path decodes a body, and
stored with the stream's identity. A row whose content is now stored, or was already in
`messages`, is deleted in that same transaction; a row that still fails stays with its new
reason and one more `replay_attempts`. A dry run does all of it and rolls each chunk back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from flespi_receiver.copy_in import Connection
from flespi_receiver.device_state import AS_RECEIVER, BatchEffects, session_effects
from flespi_receiver.fields import DEFAULT_FIELDS, MessageFields
from flespi_receiver.messages import DecodedBatch, Message, Rejected, decode_batch
from flespi_receiver.rejected_store import store_rejected
from flespi_receiver.store import chunk_transaction, store_decoded

# The rows a replay selects; $1..$4 are optional filters (NULL: any), $5/$6 the key of the last
# row seen. The primary key (stream, id) serves both the order and the next chunk.
SELECTION = """
FROM rejected_messages
WHERE ($1::text IS NULL OR stream = $1)
  AND ($2::bigint[] IS NULL OR id = ANY($2))
  AND ($3::text IS NULL OR strpos(lower(reason), lower($3)) > 0)
  AND ($4::timestamptz IS NULL OR received_at >= $4)
"""
COUNT_SELECTED = "SELECT count(*) " + SELECTION
LOCK_CHUNK = (
    "SELECT stream, id, raw, reason "
    + SELECTION
    + "  AND (stream, id) > ($5, $6)\nORDER BY stream, id\nLIMIT $7\nFOR UPDATE SKIP LOCKED"
)
DELETE_REPLAYED = "DELETE FROM rejected_messages WHERE stream = $1 AND id = ANY($2::bigint[])"
KEEP_REJECTED = """
UPDATE rejected_messages AS r
SET reason = k.reason, replay_attempts = r.replay_attempts + 1, last_replay_at = now()
FROM unnest($2::bigint[], $3::text[]) AS k(id, reason)
WHERE r.stream = $1 AND r.id = k.id
"""

# The reasons decode_batch gives a body that is not a JSON array (messages.split_array): such a
# row holds a whole body, any other row one element of an array.
_WHOLE_BODY_REASON = "body "
CHUNK_ROWS = 1000
# the summary's reasons: each cut to its first line and this many characters, the most
# frequent this many
REASON_CHARACTERS = 200
TOP_REASONS = 20
# distinct reasons counted one by one; the others together
KEPT_REASONS = 1000
OTHER_REASONS = "(other reasons)"


@dataclass(frozen=True, slots=True)
class ReplaySelection:
    """Which rejected rows to replay; None means any."""

    stream: str | None = None
    ids: Sequence[int] | None = None
    reason: str | None = None  # a part of the reason, case-insensitive
    since: datetime | None = None  # quarantined at or after

    def parameters(self) -> tuple[object, ...]:
        ids = list(self.ids) if self.ids else None
        return (self.stream, ids, self.reason, self.since)


@dataclass(slots=True)
class ReplaySummary:
    """Counts so far: rows examined, messages moved to `messages`, messages that were there
    already, rows still rejected; `selected` is the size of the selection at the start."""

    selected: int = 0
    examined: int = 0
    moved: int = 0
    already_present: int = 0
    still_rejected: int = 0
    chunks: int = 0
    dry_run: bool = False
    # rows of streams the configuration does not name: left as they are (their field names
    # and identity are unknown here)
    not_configured: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def count_reason(self, reason: str) -> None:
        """Count a reason by its first line (PostgreSQL's DETAIL quotes the row: one per row)."""
        key = reason.split("\n", 1)[0][:REASON_CHARACTERS]
        if key not in self.reasons and len(self.reasons) >= KEPT_REASONS:
            key = OTHER_REASONS  # a trigger quoting a value makes each reason new: bounded
        self.reasons[key] = self.reasons.get(key, 0) + 1

    def top_reasons(self) -> dict[str, int]:
        """The most frequent reasons, at most TOP_REASONS, the rest as one count."""
        ranked = sorted(self.reasons.items(), key=lambda item: -item[1])
        top = dict(ranked[:TOP_REASONS])
        rest = sum(count for _, count in ranked[TOP_REASONS:])
        if rest:
            top[OTHER_REASONS] = top.get(OTHER_REASONS, 0) + rest
        return top

    def as_dict(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "selected": self.selected,
            "examined": self.examined,
            "moved": self.moved,
            "already_present": self.already_present,
            "still_rejected": self.still_rejected,
            "not_configured": self.not_configured,
            "reasons": self.top_reasons(),
        }


Progress = Callable[[ReplaySummary], None]


async def count_selected(conn: Connection, selection: ReplaySelection) -> int:
    return int(await conn.fetchval(COUNT_SELECTED, *selection.parameters()))


async def replay_rejected(
    conn: Connection,
    selection: ReplaySelection,
    *,
    dry_run: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    progress: Progress | None = None,
    fields: Mapping[str, MessageFields] | None = None,
) -> ReplaySummary:
    """Replay the selected rows chunk by chunk; each chunk is committed (or, in a dry run,
    rolled back) before the next is read. `conn` must have the receiver's session settings
    (search path, device state, notify channel: app.connection_settings); each chunk keeps
    device_state and sends one NOTIFY per stream as a batch does; `fields` names each
    stream's known fields and identity; when it is given, rows of other streams are left as
    they are (counted in `not_configured`)."""
    summary = ReplaySummary(dry_run=dry_run)
    summary.selected = await count_selected(conn, selection)
    effects = await session_effects(conn)
    after: tuple[str, int] = ("", 0)
    while True:
        async with chunk_transaction(conn, dry_run=dry_run):
            await conn.execute(AS_RECEIVER)  # the chunk keeps device_state itself
            rows = await conn.fetch(LOCK_CHUNK, *selection.parameters(), *after, chunk_rows)
            if rows:
                await _replay_chunk(conn, rows, summary, fields or {}, effects)
        if not rows:
            return summary
        after = (rows[-1]["stream"], rows[-1]["id"])
        summary.chunks += 1
        if progress is not None:
            progress(summary)


async def _replay_chunk(
    conn: Connection,
    rows: Sequence[asyncpg.Record],
    summary: ReplaySummary,
    fields: Mapping[str, MessageFields],
    effects: BatchEffects,
) -> None:
    by_stream: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_stream.setdefault(row["stream"], []).append(row)
    for stream, stream_rows in by_stream.items():
        if fields and stream not in fields:
            summary.not_configured += len(stream_rows)
            continue
        stream_fields = fields.get(stream, DEFAULT_FIELDS)
        await _replay_stream_rows(conn, stream, stream_rows, summary, stream_fields, effects)
    summary.examined += len(rows)


async def _replay_stream_rows(
    conn: Connection,
    stream: str,
    rows: Sequence[asyncpg.Record],
    summary: ReplaySummary,
    fields: MessageFields,
    effects: BatchEffects,
) -> None:
    """One stream's rows of a chunk, in the chunk's transaction, with its device_state and
    one NOTIFY."""
    decoded = [_decode_row(row["raw"], row["reason"], fields) for row in rows]
    messages: list[Message] = [m for batch in decoded for m in batch.messages]
    refused: list[Rejected] = []
    stored = await store_decoded(conn, stream, messages, refused, effects) if messages else 0
    refused_reasons = {item.raw: item.reason for item in refused}

    replayed: list[int] = []
    kept: list[tuple[int, str]] = []
    new_rejected: list[Rejected] = []
    for row, batch in zip(rows, decoded, strict=True):
        failures = list(batch.rejected)
        failures += [
            Rejected(m.raw, refused_reasons[m.raw])
            for m in batch.messages
            if m.raw in refused_reasons
        ]
        is_body = row["reason"].startswith(_WHOLE_BODY_REASON)
        if not failures and (batch.messages or is_body):
            replayed.append(row["id"])
        elif failures and (not is_body or batch.body_error is not None):
            # one element, or a body that is still not an array: the row stays as it is
            kept.append((row["id"], failures[0].reason))
        elif failures:
            # a body that now splits: its elements that still fail are kept one by one
            replayed.append(row["id"])
            new_rejected += failures
        else:
            kept.append((row["id"], row["reason"]))  # an empty element stays empty
    for _, reason in kept:
        summary.count_reason(reason)
    summary.moved += stored
    summary.already_present += len(messages) - stored - len(refused_reasons)
    summary.still_rejected += len(kept) + len(new_rejected)
    if replayed:
        await conn.execute(DELETE_REPLAYED, stream, replayed)
    if kept:
        await conn.execute(KEEP_REJECTED, stream, *map(list, zip(*kept, strict=True)))
    if new_rejected:
        await store_rejected(conn, stream, new_rejected)


def _decode_row(raw: bytes, reason: str, fields: MessageFields) -> DecodedBatch:
    """A row's content decoded as the stream decodes it: a whole body as a body, an element
    as a batch of one."""
    if reason.startswith(_WHOLE_BODY_REASON):
        return decode_batch(raw, fields)
    return decode_batch(b"[" + raw + b"]", fields)
