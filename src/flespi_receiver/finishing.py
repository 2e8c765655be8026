"""The statement that ends a COPY's transaction, made while PostgreSQL still reads the COPY.

A batch stored by one COPY ends with one statement (device_state and NOTIFY,
device_state.finishing_statement) whose arguments come from the batch folded per device. The
fold is complete once the COPY's data is all made; PostgreSQL is then most often still busy
with the last rows sent, so the arguments (a list per column, one element per device) are
built right after asyncpg has sent the end of the COPY, while the receiver would otherwise
only wait for PostgreSQL's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from flespi_receiver.device_state import BatchEffects, DeviceFold, Stored, finishing_statement

Statement = tuple[str, list[Any]] | None


class Finishing:
    """The finishing statement of the batch whose COPY data is `after(source)`."""

    def __init__(self, effects: BatchEffects, stream: str, fold: DeviceFold) -> None:
        self._effects = effects
        self._stream = stream
        self._fold = fold
        self._made: list[Statement] = []

    async def after(
        self, source: AsyncIterator[bytes | memoryview]
    ) -> AsyncIterator[bytes | memoryview]:
        """`source` as it is; once it is exhausted, the statement is made at the event loop's
        next turn: after asyncpg has sent the end of the COPY and waits for PostgreSQL."""
        async for chunk in source:
            yield chunk
        asyncio.get_running_loop().call_soon(self._make)

    def _make(self) -> None:
        if not self._made and self._fold:
            self._made.append(
                finishing_statement(
                    self._effects, self._stream, self._fold, Stored.copied(self._fold)
                )
            )

    def statement(self) -> Statement:
        """The statement and its arguments for what the COPY stored (every row of the fold);
        None when none is needed."""
        self._make()
        return self._made[0] if self._made else None
