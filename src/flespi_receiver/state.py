"""Typed keys for what the running application holds."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

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
