"""A body one COPY could not store because some of its messages are stored already (most often
a batch flespi sent again), stored window by window as it is split once more.

The body's chunks are split again as they arrived; each window of WINDOW messages is looked up
in the stream (which identities are stored?) and what is new goes in by COPY, all in one
transaction with the quarantine, the device state and the NOTIFY, as for any batch. Only a
window of messages is held at a time, not every message of the body decoded apart, so a
resent body costs about what it cost the first time (tests/test_resent.py). A window whose
COPY PostgreSQL refuses (a row a constraint or a trigger refuses, one another receiver stored
meanwhile) goes message by message in savepoints, so that only the refused rows are set apart.
What only the careful path tells apart (every new message refused and none quarantined
before: content or the database's state?; content a refusing stream must answer 422 for; a
body that is not an array) rolls this back and leaves the body to it (store.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import asyncpg

from flespi_receiver import body_cost
from flespi_receiver.body import BodyReader
from flespi_receiver.copy_format import copy_chunks
from flespi_receiver.copy_in import (
    Connection,
    as_async,
    copy_rows,
    existing,
    insert_record,
    insert_skipping_conflicts,
    unless_careful,
)
from flespi_receiver.device_state import BatchEffects, DeviceFold, Stored, finishing_statement
from flespi_receiver.errors import BatchRejected, drop_frames
from flespi_receiver.failures import state_kind
from flespi_receiver.fields import MessageFields
from flespi_receiver.messages import (
    Message,
    Rejected,
    exact_messages,
    identity_of,
    in_turns,
    judged_large_apart,
)
from flespi_receiver.rejected_store import quarantined, store_rejected
from flespi_receiver.splitter import ElementSplitter, NotExact

# messages looked up and copied at a time: one round trip and one COPY each
WINDOW = 1000
# the rest of a body larger than this (bytes) is split in a thread
_THREADED_SPLIT = 1024 * 1024


class _Windows:
    """The messages of a body, window by window: what was stored, what was there before, what
    PostgreSQL refused.

    A copy of a message in the same window is left out there; one in a later window is found
    stored, by this transaction, like a message stored before: no identity of the whole body
    is held. A window whose COPY PostgreSQL refuses goes message by message, each in a
    savepoint, so that only the refused messages are set apart."""

    def __init__(self, conn: Connection, stream: str, fold: DeviceFold) -> None:
        self.conn = conn
        self.stream = stream
        self.fold = fold
        self.window: dict[bytes, Message] = {}
        self.stored = 0
        self.refused: list[tuple[Message, asyncpg.PostgresError]] = []

    async def add(self, messages: Iterable[Message]) -> None:
        for message in messages:
            self.window.setdefault(message.identity, message)
        if len(self.window) >= WINDOW:
            await self.flush()

    async def flush(self) -> None:
        window, self.window = self.window, {}
        if not window:
            return
        stored_before = await existing(self.conn, self.stream, window.values())
        fresh = [message for identity, message in window.items() if identity not in stored_before]
        if not fresh:
            return
        try:
            async with self.conn.transaction():  # a savepoint: a refusal undoes this window only
                chunks = copy_chunks(self.stream, fresh, None)
                self.stored += await copy_rows(self.conn, as_async(chunks))
        except asyncpg.PostgresError as exc:
            if state_kind(exc) is not None:
                raise
            drop_frames(exc)
            await self._one_by_one(fresh)
            return
        for message in fresh:
            self.fold.add(message, message.columns, message.identity)

    async def _one_by_one(self, fresh: list[Message]) -> None:
        for message in fresh:
            try:
                async with self.conn.transaction():
                    record = insert_record(self.stream, message)
                    ids = await insert_skipping_conflicts(self.conn, [record])
            except asyncpg.PostgresError as exc:
                if state_kind(exc) is not None:
                    raise
                self.refused.append((message, exc))
                continue
            if ids:  # else another receiver stored it meanwhile
                self.stored += 1
                self.fold.add(message, message.columns, message.identity)


async def store_in_windows(
    conn: Connection,
    stream: str,
    body: BodyReader,
    fields: MessageFields,
    quarantine: bool,
    effects: BatchEffects,
) -> tuple[int, int, int, int] | None:
    """Store `body` window by window in one transaction; (messages, stored, duplicates,
    rejected), or None when the careful path must decide (nothing stored). Raises what
    tells the database's state (failures.py), the body's own errors (BodyTimeout...), and
    BatchRejected when a refusing stream's body holds a row PostgreSQL refuses."""
    rejected: list[Rejected] | None = [] if quarantine else None
    fold = DeviceFold(effects.merge)
    split = body_cost.Split()

    async def attempt() -> tuple[int, int, int, int]:
        splitter = ElementSplitter()
        windows = _Windows(conn, stream, fold)
        async with conn.transaction():
            # a deferred constraint refuses its own message, not the COMMIT (as in store.py)
            await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
            async for data in body.chunks():
                elements = await split.piece(body, splitter, data, fold.held_devices, fields)
                async for part in in_turns(elements):
                    await windows.add(exact_messages(part, fields, rejected))
            large = splitter.pending > _THREADED_SPLIT
            ends = await asyncio.to_thread(splitter.finish) if large else splitter.finish()
            last = await judged_large_apart(ends, fields)
            split.elements += len(last)
            await windows.add(exact_messages(last, fields, rejected))
            await windows.flush()
            if windows.refused:
                await _judge_refused(conn, stream, windows, rejected)
            if rejected:
                await store_rejected(conn, stream, rejected)
            if windows.stored:
                statement = finishing_statement(effects, stream, fold, Stored.copied(fold))
                if statement is not None:
                    await conn.execute(statement[0], *statement[1])
        kept_apart = len(rejected) if rejected else 0
        duplicates = split.elements - kept_apart - windows.stored
        return split.elements, windows.stored, duplicates, kept_apart

    return await unless_careful(attempt())


async def _judge_refused(
    conn: Connection, stream: str, windows: _Windows, rejected: list[Rejected] | None
) -> None:
    """Messages PostgreSQL refused are content when another message of the body stored, or
    when they were quarantined before (a resent batch); then they are set apart (a refusing
    stream answers 422). Else only the careful path tells content from the database's state:
    NotExact."""
    refused = windows.refused
    if not windows.stored:
        known = await quarantined(conn, stream, [message.raw for message, _ in refused])
        if any(identity_of(message.raw) not in known for message, _ in refused):
            raise NotExact
    reasons = [
        Rejected(message.raw, f"PostgreSQL refused it: {error}") for message, error in refused
    ]
    if rejected is None:
        raise BatchRejected(reasons[0].reason)
    rejected.extend(reasons)
