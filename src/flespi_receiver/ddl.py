"""Schema changes beside writers: each step waits for its locks only briefly, then tries again.

A DDL statement that waits for a lock makes every later writer of that table queue behind it:
one batch still arriving (up to `server.body_timeout`) would hold up all the others. So a step
runs in a transaction of its own with a short `lock_timeout`; when a lock is not free it is
rolled back and tried again after a growing pause, until `patience` runs out.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import structlog

from flespi_receiver.copy_in import Connection

log = structlog.get_logger("flespi_receiver.ddl")

T = TypeVar("T")

# longest time writers may queue behind one attempt, in milliseconds
LOCK_WAIT_MS = 200
FIRST_PAUSE = 0.05  # seconds between attempts, doubled each time up to LONGEST_PAUSE
LONGEST_PAUSE = 2.0
# the receiver's own SQL reads and writes dates as ISO text in UTC, whatever the database's
# or the role's defaults are (partition bounds, retention arithmetic)
PIN_SESSION = (
    "SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'postgres'; "
    "SET LOCAL TimeZone = 'UTC'"
)


class LocksBusy(Exception):
    """The locks a step needs stayed taken for longer than its patience (seconds)."""


async def with_short_locks(
    conn: Connection, step: Callable[[], Awaitable[T]], *, what: str, patience: float
) -> T:
    """`step()` in a transaction of its own whose lock waits last LOCK_WAIT_MS at most.

    Retried while a lock is not free (or a deadlock was broken); raises LocksBusy once
    `patience` seconds have passed. Any other error is raised as it is.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    pause = FIRST_PAUSE
    attempts = 0
    while True:
        attempts += 1
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_WAIT_MS}ms'; {PIN_SESSION}")
                return await step()
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            if loop.time() + pause > deadline:
                raise LocksBusy(
                    f"{what}: the tables stayed in use for {patience:.0f} s ({attempts} attempts)"
                ) from None
            log.debug("lock not free, trying again", step=what, attempt=attempts)
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))  # noqa: S311 - not crypto
            pause = min(pause * 2, LONGEST_PAUSE)
