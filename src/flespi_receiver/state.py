"""Typed keys for what the running application holds."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

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
# each stream's endpoint by stream name, for reloading credentials on SIGHUP
ENDPOINTS = web.AppKey("endpoints", dict[str, "StreamEndpoint"])
# what the last batches said about the database, for /readyz
DATABASE_HEALTH = web.AppKey("database_health", DatabaseHealth)


class InFlight:
    """Counts the batch requests being answered, so that shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        self._idle.clear()

    def __exit__(self, *exc: object) -> None:
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


IN_FLIGHT = web.AppKey("in_flight", InFlight)
