"""Typed keys for what the running application holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import StreamReader, web

from flespi_receiver.errors import ShutdownTimeout
from flespi_receiver.failures import DatabaseHealth
from flespi_receiver.metrics import Metrics

if TYPE_CHECKING:
    from flespi_receiver.ingest import StreamEndpoint

POOL = web.AppKey("pool", asyncpg.Pool)
# cleared when shutdown starts: batches that arrive from then on get 503 and come again later
ACCEPTING = web.AppKey("accepting", asyncio.Event)
# the PostgreSQL schema that holds the receiver's tables
SCHEMA = web.AppKey("schema", str)
METRICS = web.AppKey("metrics", Metrics)
# the stream whose credentials a request carried (or whose addresses it came from, for a
# stream without credentials): only such a sender's connection is kept alive after the reply
SENDER = web.RequestKey("sender", str)
# each stream's endpoint by stream name, for reloading credentials on SIGHUP
ENDPOINTS = web.AppKey("endpoints", dict[str, "StreamEndpoint"])
# what the last batches said about the database, for /readyz
DATABASE_HEALTH = web.AppKey("database_health", DatabaseHealth)


class InFlight:
    """The batch requests being answered, so that shutdown can wait for them and, once
    server.shutdown_timeout has passed, end the bodies still arriving."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._bodies: set[StreamReader] = set()

    @contextlib.contextmanager
    def answering(self, body: StreamReader) -> Iterator[None]:
        """Count one request while it is answered; `body` is its request.content."""
        self.count += 1
        self._idle.clear()
        self._bodies.add(body)
        try:
            yield
        finally:
            self._bodies.discard(body)
            self.count -= 1
            if not self.count:
                self._idle.set()

    async def wait_idle(self, seconds: float) -> bool:
        """True once no request is being answered; False if some still are after `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def end_bodies(self) -> int:
        """Make every body still arriving raise ShutdownTimeout in its reader (the handler
        then answers 503 and stores nothing); return how many there were."""
        arriving = [body for body in self._bodies if not body.is_eof()]
        for body in arriving:
            body.set_exception(ShutdownTimeout())
        return len(arriving)


IN_FLIGHT = web.AppKey("in_flight", InFlight)
