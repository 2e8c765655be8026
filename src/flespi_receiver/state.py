"""Typed keys for what the running application holds."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp import web

POOL = web.AppKey("pool", asyncpg.Pool)
# cleared when shutdown starts: batches that arrive from then on get 503 and come again later
ACCEPTING = web.AppKey("accepting", asyncio.Event)
# the PostgreSQL schema that holds the receiver's tables
SCHEMA = web.AppKey("schema", str)
