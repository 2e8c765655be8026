"""A body one COPY could not store because some of its messages are stored already (most often
a batch flespi sent again), stored window by window as it is split once more.

The body's chunks are split again as they arrived; each window of WINDOW messages is looked up
in the stream (which identities are stored?) and what is new goes in by COPY, all in one
transaction with the quarantine, the device state and the NOTIFY, as for any batch. Only a
window of messages is held at a time, not every message of the body decoded apart, so a
resent body costs about what it cost the first time (`flespi-receiver bench --memory-shapes`).
What only the careful path tells apart (a message PostgreSQL refuses, one stored by another
receiver meanwhile, content a refusing stream must answer 422 for, a body that is not an
array) rolls this back and leaves the body to it (store.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from flespi_receiver import body_cost
from flespi_receiver.body import BodyReader
from flespi_receiver.copy_format import copy_chunks
from flespi_receiver.copy_in import Connection, as_async, copy_rows, existing, unless_careful
from flespi_receiver.device_state import BatchEffects, DeviceFold, Stored, finishing_statement
from flespi_receiver.fields import MessageFields
from flespi_receiver.messages import (
    Message,
    Rejected,
    exact_messages,
    in_turns,
    judged_large_apart,
)
from flespi_receiver.rejected_store import store_rejected
from flespi_receiver.splitter import ElementSplitter

# messages looked up and copied at a time: one round trip and one COPY each
WINDOW = 1000
# the rest of a body larger than this (bytes) is split in a thread
_THREADED_SPLIT = 1024 * 1024


class _Windows:
    """The messages of a body, window by window: what was stored, what was there before.

    A copy of a message in the same window is left out there; one in a later window is found
    stored, by this transaction, like a message stored before: no identity of the whole body
    is held."""

    def __init__(self, conn: Connection, stream: str, fold: DeviceFold) -> None:
        self.conn = conn
        self.stream = stream
        self.fold = fold
        self.window: dict[bytes, Message] = {}
        self.stored = 0

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
        if fresh:
            chunks = copy_chunks(self.stream, fresh, self.fold)
            self.stored += await copy_rows(self.conn, as_async(chunks))


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
    tells the database's state (failures.py) and the body's own errors (BodyTimeout...)."""
    rejected: list[Rejected] | None = [] if quarantine else None
    fold = DeviceFold(effects.merge)
    split = body_cost.Split()

    async def attempt() -> tuple[int, int, int, int]:
        splitter = ElementSplitter()
        windows = _Windows(conn, stream, fold)
        async with conn.transaction():
            async for data in body.chunks():
                devices = len(fold.latest) + len(fold.every)
                pending = splitter.pending + len(data)
                await body.need(body_cost.streamed(body.size, pending, split, devices))
                elements = await judged_large_apart(splitter.feed(data), fields)
                split.elements += len(elements)
                split.size += len(data)
                async for part in in_turns(elements):
                    await windows.add(exact_messages(part, fields, rejected))
            large = splitter.pending > _THREADED_SPLIT
            ends = await asyncio.to_thread(splitter.finish) if large else splitter.finish()
            last = await judged_large_apart(ends, fields)
            split.elements += len(last)
            await windows.add(exact_messages(last, fields, rejected))
            await windows.flush()
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
