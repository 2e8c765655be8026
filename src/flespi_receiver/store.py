"""Writing a decoded batch to PostgreSQL in one transaction; knows SQL, knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import msgspec
import structlog

from flespi_receiver import body_cost
from flespi_receiver.body import BodyReader
from flespi_receiver.copy_format import (
    HEADER,
    TRAILER,
    copy_chunks,
    element_chunks,
    stream_field,
)
from flespi_receiver.copy_in import (
    INSERT_MESSAGES,
    Connection,
    as_async,
    copy_rows,
    ended_on_body_error,
    existing,
    insert_record,
    insert_skipping_conflicts,
    unless_careful,
)
from flespi_receiver.device_state import (
    DEFAULT_EFFECTS,
    BatchEffects,
    DeviceFold,
    Stored,
    finishing_statement,
    small_batch_statement,
)
from flespi_receiver.errors import BatchRejected, BodyError
from flespi_receiver.failures import DatabaseState, shared_kind, state_kind
from flespi_receiver.fields import DEFAULT_FIELDS, MessageFields
from flespi_receiver.finishing import Finishing
from flespi_receiver.identity_set import Distinct
from flespi_receiver.json_scan import split_array
from flespi_receiver.messages import (
    MAX_REJECTED_ELEMENTS,
    DecodedBatch,
    Message,
    Rejected,
    decode_batch,
    exact_messages,
    identity_of,
    in_turns,
    judged_large_apart,
    kept_whole,
)
from flespi_receiver.rejected_store import (
    INSERT_REJECTED_ALSO,
    quarantined,
    rejected_arrays,
    store_rejected,
)
from flespi_receiver.resent import store_in_windows
from flespi_receiver.splitter import ElementSplitter, split_elements, without_bom
from flespi_receiver.timeouts import bound_streamed, client_timeout

log = structlog.get_logger("flespi_receiver.store")


_T = TypeVar("_T")

# Up to this many messages, one INSERT statement beats COPY in a transaction.
SMALL_BATCH = 50
# bodies larger than this (bytes) are decoded carefully in a thread of their own
THREADED_DECODE = 1024 * 1024


# how a batch was stored (StoreResult.path, the `path` of its `batch` log line): one INSERT
# statement, one COPY of the whole body, one COPY while the body arrived, window by window as
# it was split again (resent.py), or message by message
INSERT_PATH, COPY_PATH, STREAMED_PATH = "insert", "copy", "streamed"
WINDOWS_PATH, CAREFUL_PATH = "windows", "careful"


@dataclass(frozen=True, slots=True)
class StoreResult:
    messages: int
    stored: int
    duplicates: int
    rejected: int
    path: str = CAREFUL_PATH


async def store_batch(
    conn: Connection,
    stream: str,
    body: bytes | BodyReader,
    *,
    quarantine: bool = True,
    command_timeout: float | None = None,
    fields: MessageFields = DEFAULT_FIELDS,
    effects: BatchEffects = DEFAULT_EFFECTS,
) -> StoreResult:
    """Decode and store a batch body in one transaction; on return it is committed.

    A body still arriving (a BodyReader) is stored as it arrives when it can be; otherwise
    it is read whole first. That COPY may take the time left for the body to arrive plus
    `command_timeout` seconds (None: the connection's own limit) for PostgreSQL's work.
    With `quarantine` off, content that can't be stored raises BatchRejected and nothing is
    kept. A failure that is the database's state (see failures.py) raises: DatabaseState,
    or asyncpg's own exception. `fields` names the known fields in this stream's messages.
    `effects`: device_state and NOTIFY, in the same transaction, one NOTIFY per batch.
    """
    fields.time_seen = False
    result = await _store_batch(conn, stream, body, quarantine, command_timeout, fields, effects)
    if result.messages and not fields.time_seen and not fields.warned_without_time:
        # said once per stream, so that a notation that does not match is seen at once
        fields.warned_without_time = True
        log.warning(
            "no message of the batch has a time field; check the stream's field names",
            stream=stream,
            ts_field=fields.names["ts"],
            server_ts_field=fields.names["server_ts"],
        )
    return result


async def _store_batch(
    conn: Connection,
    stream: str,
    body: bytes | BodyReader,
    quarantine: bool,
    command_timeout: float | None,
    fields: MessageFields,
    effects: BatchEffects,
) -> StoreResult:
    if isinstance(body, BodyReader):
        arrival = body.remaining()
        limit = None if command_timeout is None else client_timeout(arrival + command_timeout)
        fold = DeviceFold(effects.merge)
        # content that must be quarantined, set aside while the rest is copied; a stream that
        # refuses such content takes the careful way, which decides between 400 and 422
        set_aside: list[Rejected] | None = [] if quarantine else None
        distinct = Distinct()  # a copy of a message within the batch is counted, not stored
        split = body_cost.Split()
        rows = _streamed_rows(stream, body, fields, fold, split, set_aside, distinct)
        streamed = await _copy_optimistically(
            conn, stream, rows, fold, effects, limit, command_timeout, arrival, set_aside
        )
        if streamed is not None:
            return _copied(streamed, set_aside, STREAMED_PATH, distinct.repeated)
        await rows.aclose()  # lets go of what the splitter held before the body is joined
        del rows, fold, distinct  # and of the attempt's fold and identities, before a new pass
        if set_aside is not None and len(set_aside) > MAX_REJECTED_ELEMENTS:
            # more refused elements than are kept apart: the body is kept whole, as the careful
            # path would decide after decoding every message of it again
            await body.need(body_cost.careful(body.size, body_cost.Split()))
            kept = kept_whole(await body.read_all(), set_aside[0].reason)
            return await _store_careful(conn, stream, kept, quarantine, effects)
        # most often some of its messages were stored before (a resent batch): window by window
        windows = await store_in_windows(conn, stream, body, fields, quarantine, effects)
        if windows is not None:
            messages, stored, duplicates, rejected = windows
            return StoreResult(messages, stored, duplicates, rejected, path=WINDOWS_PATH)
        # the careful path holds the body joined and each message apart: room for that first
        await body.need(body_cost.careful(body.size, split))
        body = await body.read_all()
    else:
        optimistic = await _store_optimistically(conn, stream, body, fields, effects, quarantine)
        if optimistic is not None:
            return optimistic
    # (a body stored while it arrived that needs care would need it again as a whole: what
    # stopped its COPY, a message stored before or refused, would stop that one too)
    # a large body's careful decoding takes seconds: in a thread, the other streams go on
    decoding = (
        asyncio.to_thread(decode_batch, body, fields) if len(body) > THREADED_DECODE else None
    )
    batch = await decoding if decoding is not None else decode_batch(body, fields)
    return await _store_careful(conn, stream, batch, quarantine, effects)


async def _store_careful(
    conn: Connection, stream: str, batch: DecodedBatch, quarantine: bool, effects: BatchEffects
) -> StoreResult:
    """A decoded batch, message by message, in one transaction."""
    if not quarantine and batch.first_refusal is not None:
        raise BatchRejected(batch.first_refusal)  # bad messages, however many: 422
    if not quarantine and batch.rejected:
        raise BatchRejected(batch.rejected[0].reason, whole_body=batch.body_error is not None)
    rejected = list(batch.rejected)
    async with conn.transaction():
        stored = await _store_messages(conn, stream, batch.messages, rejected)
        if not quarantine and rejected:
            raise BatchRejected(rejected[0].reason)
        if rejected:
            await store_rejected(conn, stream, rejected)
        refused = {item.raw for item in rejected}
        kept = (m for m in batch.messages if m.raw not in refused)
        await _finish(conn, stream, effects, _fold(kept, effects), stored)
    count = stored.count if stored else 0
    duplicates = (
        len(batch.messages) + batch.repeated - count - (len(rejected) - len(batch.rejected))
    )
    return StoreResult(
        messages=batch.size, stored=count, duplicates=duplicates, rejected=len(rejected)
    )


def _copied(stored: int, rejected: list[Rejected] | None, path: str, repeated: int) -> StoreResult:
    """A batch stored by one COPY: every message new (`repeated` copies of some within the
    batch counted as duplicates), the set-aside content quarantined."""
    count = len(rejected) if rejected else 0
    return StoreResult(
        messages=stored + count + repeated,
        stored=stored,
        duplicates=repeated,
        rejected=count,
        path=path,
    )


def _fold(messages: Iterable[Message], effects: BatchEffects) -> DeviceFold:
    fold = DeviceFold(effects.merge)
    if effects.device_state:
        for message in messages:
            fold.add(message, message.columns, message.identity)
    return fold


async def _finish(
    conn: Connection, stream: str, effects: BatchEffects, fold: DeviceFold, stored: Stored | None
) -> None:
    """The batch's device state and NOTIFY, in its transaction, as its last statement."""
    statement = finishing_statement(effects, stream, fold, stored)
    if statement is not None:
        await conn.execute(statement[0], *statement[1])


async def _store_optimistically(
    conn: Connection,
    stream: str,
    body: bytes,
    fields: MessageFields,
    effects: BatchEffects,
    quarantine: bool = True,
) -> StoreResult | None:
    """The common case: a JSON array whose elements are valid and exactly re-encodable
    messages, or content quarantined beside them in the same transaction (`quarantine`; up to
    MAX_REJECTED_ELEMENTS elements). None: be careful."""
    elements: list[msgspec.Raw] | list[bytes] | None = split_elements(body)
    if elements is None:
        # an element msgspec can't read (a lone surrogate, NaN): split by structure alone, so
        # that each element is judged on its own; not an array at all: the careful way
        split = split_array(bytes(without_bom(body)))
        if isinstance(split, str):
            return None
        elements = split
    set_aside: list[Rejected] | None = [] if quarantine else None
    if len(elements) > SMALL_BATCH:
        fold = DeviceFold(effects.merge)
        distinct = Distinct()
        chunks = copy_chunks(stream, elements, fold, distinct, fields=fields, rejected=set_aside)
        copy_data = as_async(chunks)
        stored = await _copy_optimistically(
            conn, stream, copy_data, fold, effects, rejected=set_aside
        )
        if stored is None:
            return None
        return _copied(stored, set_aside, COPY_PATH, distinct.repeated)
    # a small batch: one INSERT statement, atomic on its own, costs one round trip where COPY
    # in a transaction costs four
    records: list[tuple[Any, ...]] = []

    async def insert() -> int:
        fold = DeviceFold(effects.merge)
        for message in exact_messages(elements, fields, set_aside):
            records.append(insert_record(stream, message))
            if effects.device_state:
                fold.add(message, message.columns, message.identity)
        if not records:
            if set_aside:
                await store_rejected(conn, stream, set_aside)
            return 0
        arrays = [list(column) for column in zip(*records, strict=True)][1:]
        if set_aside:
            # the quarantined content goes in with the rows, by the same statement
            statement, extra = small_batch_statement(
                effects, INSERT_MESSAGES, fold, 15, also=INSERT_REJECTED_ALSO
            )
            arrays += rejected_arrays(set_aside)
        else:
            statement, extra = small_batch_statement(effects, INSERT_MESSAGES, fold, 12)
        stored = await conn.fetchval(statement, stream, *arrays, *extra)
        return int(stored)

    stored = await unless_careful(insert())
    if stored is None:
        return None
    rejected = len(set_aside) if set_aside else 0
    return StoreResult(
        messages=len(records) + rejected,
        stored=stored,
        duplicates=len(records) - stored,
        rejected=rejected,
        path=INSERT_PATH,
    )


async def _copy_optimistically(
    conn: Connection,
    stream: str,
    copy_data: AsyncIterator[bytes | memoryview],
    fold: DeviceFold,
    effects: BatchEffects,
    limit: float | None = None,
    command_timeout: float | None = None,
    arrival: float = 0.0,
    rejected: list[Rejected] | None = None,
) -> int | None:
    """The common case, in one COPY: every message is new, valid and exactly re-encodable.

    Messages are checked and encoded (and folded per device) while the first ones are already
    on their way to PostgreSQL. In a transaction of its own with the content set aside in
    `rejected` while the data was made (quarantined), the device state and NOTIFY, committed
    on success; returns how many rows were stored, or None, having stored nothing, when the
    careful path is needed.
    With `command_timeout`, the data arrives with a body (`arrival` seconds left for it):
    PostgreSQL's own limits are set for that (timeouts.bound_streamed).
    """

    async def copy() -> int:
        async with conn.transaction():
            if command_timeout is not None:
                await bound_streamed(conn, command_timeout, arrival)
            finishing = Finishing(effects, stream, fold)
            stopped: list[BodyError] = []
            data = ended_on_body_error(copy_data, stopped)
            try:
                stored = await copy_rows(conn, finishing.after(data), limit)
            except asyncpg.PostgresError:
                if stopped:  # the body's error, not the COPY it cut short
                    raise stopped[0] from None
                raise
            if stopped:
                raise stopped[0]
            if rejected:  # complete now: the COPY has read all its data
                await store_rejected(conn, stream, rejected)
            if stored and (statement := finishing.statement()) is not None:
                await conn.execute(statement[0], *statement[1])
            return stored

    return await unless_careful(copy())


async def _streamed_rows(
    stream: str,
    body: BodyReader,
    fields: MessageFields,
    fold: DeviceFold,
    split: body_cost.Split,
    rejected: list[Rejected] | None = None,
    distinct: Distinct | None = None,
) -> AsyncGenerator[bytes | memoryview, None]:
    """The COPY data of a body that is still arriving, encoded as its messages come in:
    PostgreSQL works on the first rows while the rest of the body is on its way. Content to
    quarantine is appended to `rejected` (see exact_messages). `split` counts what was split;
    before each piece the body takes room for what it holds (body_cost.streamed)."""
    splitter = ElementSplitter()
    field = stream_field(stream)
    yield HEADER
    async for data in body.chunks():
        elements = await split.piece(body, splitter, data, fold.held_devices, fields)
        async for part in in_turns(elements):
            for chunk in element_chunks(field, part, fields, rejected, fold, distinct):
                yield chunk
    # the rest, split whole (in a thread when it is large: maybe by the slower scanner)
    large = splitter.pending > THREADED_DECODE
    ends = await asyncio.to_thread(splitter.finish) if large else splitter.finish()
    last = await judged_large_apart(ends, fields)
    for chunk in element_chunks(field, last, fields, rejected, fold, distinct):
        yield chunk
    yield TRAILER


async def _store_messages(
    conn: Connection, stream: str, messages: list[Message], rejected: list[Rejected]
) -> Stored | None:
    """Store what the stream doesn't hold yet; what was stored, None for nothing."""
    by_identity: dict[bytes, Message] = {}
    for message in messages:
        by_identity.setdefault(message.identity, message)
    if not by_identity:
        return None
    # a deferred constraint would refuse a message only at COMMIT, where no message can be
    # told apart: checked at each statement instead, so that one message's refusal is its own
    await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
    stored_before = await existing(conn, stream, by_identity.values())
    # arrival order, so that ids increase in the order flespi sent the messages
    fresh = [(i, m) for i, m in by_identity.items() if i not in stored_before]
    if not fresh:
        return None
    copied = DeviceFold(merge=False)

    async def copy() -> int:
        async with conn.transaction():
            # COPY is the fastest way in; it fails as a whole if another receiver got there first
            chunks = copy_chunks(stream, (message for _, message in fresh), copied)
            return await copy_rows(conn, as_async(chunks))

    if await unless_careful(copy()) is not None:
        return Stored.copied(copied)
    # another receiver stored some of these meanwhile, or PostgreSQL refused one of them
    records = [insert_record(stream, message) for _, message in fresh]

    async def insert() -> list[int]:
        async with conn.transaction():
            return await insert_skipping_conflicts(conn, records)

    ids = await unless_careful(insert())
    if ids is None:
        settled = [m for i, m in by_identity.items() if i in stored_before]
        ids = await _insert_one_by_one(conn, stream, records, fresh, rejected, settled)
    return Stored(len(ids), min(ids), max(ids)) if ids else None


async def _insert_one_by_one(
    conn: Connection,
    stream: str,
    records: list[tuple[Any, ...]],
    fresh: list[tuple[bytes, Message]],
    rejected: list[Rejected],
    settled: list[Message],
) -> list[int]:
    """PostgreSQL refused something in the batch: find which messages, keep the rest; the
    ids stored.

    A message that fails while another one stores is refused content. A message of the batch
    stored before (`settled`, a resent batch) counts as one that stores when its INSERT still
    passes: row triggers and privileges run before ON CONFLICT skips it. When none stores,
    the error's class decides between content and the database's state (failures.py),
    unless the message was quarantined before.
    """
    stored: list[int] = []
    succeeded = 0
    failed: list[tuple[Message, asyncpg.PostgresError]] = []
    for record, (_, message) in zip(records, fresh, strict=True):
        try:
            async with conn.transaction():
                stored += await insert_skipping_conflicts(conn, [record])
            succeeded += 1
        except asyncpg.PostgresError as exc:
            if state_kind(exc) is not None:
                raise
            failed.append((message, exc))
    if failed and not succeeded and settled:
        succeeded = await _still_insertable(conn, stream, settled[0])
    if failed and not succeeded:
        # a resent batch: what was quarantined before gets the same answer
        known = await quarantined(conn, stream, [m.raw for m, _ in failed])
        for message, error in failed:
            kind = shared_kind(error)
            if kind is not None and identity_of(message.raw) not in known:
                raise DatabaseState(kind, error) from error
    rejected.extend(Rejected(m.raw, f"PostgreSQL refused it: {error}") for m, error in failed)
    return stored


async def _still_insertable(conn: Connection, stream: str, message: Message) -> int:
    """1 when a message stored before still passes everything its INSERT would run (BEFORE
    and AFTER row triggers, privileges, constraints), else 0; rolled back either way.

    It goes in again under an identity of its own, so that ON CONFLICT does not skip it
    before the AFTER triggers; nothing of it stays.
    """
    record = insert_record(stream, message)
    probe_record = (*record[:-1], secrets.token_bytes(len(record[-1])))
    probe = conn.transaction()
    await probe.start()
    try:
        await insert_skipping_conflicts(conn, [probe_record])
    except asyncpg.PostgresError as exc:
        if state_kind(exc) is not None:
            raise
        return 0
    finally:
        await probe.rollback()
    return 1


async def store_decoded(
    conn: Connection,
    stream: str,
    messages: list[Message],
    rejected: list[Rejected],
    effects: BatchEffects = DEFAULT_EFFECTS,
) -> int:
    """Store already decoded messages the way a batch's careful path does, inside the caller's
    transaction: what is already in the stream is skipped, what PostgreSQL refuses is appended
    to `rejected` (not stored there), and `effects` (device_state, one NOTIFY) follow as for a
    batch. Returns how many rows were stored. Used by replay and backfill, so that they share
    the stream's identity, derived columns, quarantine and derived state."""
    before = len(rejected)
    stored = await _store_messages(conn, stream, messages, rejected)
    refused = {item.raw for item in rejected[before:]}
    kept = (m for m in messages if m.raw not in refused)
    await _finish(conn, stream, effects, _fold(kept, effects), stored)
    return stored.count if stored else 0


@asynccontextmanager
async def chunk_transaction(conn: Connection, *, dry_run: bool) -> AsyncIterator[None]:
    """One chunk of replay or backfill: committed, or rolled back in a dry run or on error."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    except BaseException:
        await transaction.rollback()
        raise
    if dry_run:
        await transaction.rollback()
    else:
        await transaction.commit()
