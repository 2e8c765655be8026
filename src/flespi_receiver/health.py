"""Liveness and readiness: `/healthz` (the process serves) and `/readyz` (it can store batches)."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp import web

from flespi_receiver.ingest import DATABASE_UNAVAILABLE, error_response, json_response
from flespi_receiver.migrate import pending_migrations
from flespi_receiver.state import ACCEPTING, POOL, SCHEMA

READY_TIMEOUT = 3.0
NOT_READY: tuple[type[BaseException], ...] = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError)


async def healthz(request: web.Request) -> web.Response:
    """Always cheap: no database round trip."""
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when not shutting down, PostgreSQL answers and the schema has every migration."""
    if not request.app[ACCEPTING].is_set():
        return error_response(503, "shutting down")
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            async with request.app[POOL].acquire() as conn:
                pending = await pending_migrations(conn, request.app[SCHEMA])
    except NOT_READY as exc:
        return error_response(503, f"database unavailable: {type(exc).__name__}")
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        return error_response(503, f"schema not current, pending migrations: {names}")
    return json_response(200, {"status": "ready"})


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
