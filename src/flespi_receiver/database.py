"""Reaching the configured database: its URL (embedded or not) and the receiver's schema on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import structlog

from flespi_receiver.app import connection_settings
from flespi_receiver.columns import apply_columns
from flespi_receiver.config import Settings
from flespi_receiver.migrate import migrate
from flespi_receiver.partitions import ensure_partitioned, maintain
from flespi_receiver.trigger import apply_trigger

log = structlog.get_logger("flespi_receiver.database")


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The configured URL, or an embedded PostgreSQL run for as long as the block lasts."""
    url = settings.database.url.get_secret_value()
    if url:
        yield url
        return
    from flespi_receiver.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.database.data_dir)
    log.info("starting embedded PostgreSQL", data_dir=str(server.data_dir))
    with server as embedded_url:
        yield embedded_url
    log.info("embedded PostgreSQL stopped")


async def connect(settings: Settings, dsn: str) -> asyncpg.Connection:
    """One connection with the receiver's session settings (search_path on its schema)."""
    return await asyncpg.connect(dsn, server_settings=connection_settings(settings))


async def apply_migrations(settings: Settings, dsn: str) -> None:
    """Bring the schema to what the settings ask: migrations, partitions, columns, trigger."""
    conn = await connect(settings, dsn)
    try:
        applied = await migrate(conn, settings.database.schema_name)
        await ensure_partitioned(conn, settings.partitioning)
        await maintain(conn, settings.partitioning)
        await apply_columns(conn, settings.columns)
        await apply_trigger(conn, settings.database)
    finally:
        await conn.close()
    log.info(
        "schema up to date",
        schema=settings.database.schema_name,
        applied=[f"{m.version:04d}_{m.name}" for m in applied],
    )
