"""Reaching the configured database: its URL (embedded or not) and the receiver's schema on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import structlog

from flespi_receiver.columns import apply_columns
from flespi_receiver.config import Settings
from flespi_receiver.device_state import apply_state_mode, catch_up_states
from flespi_receiver.errors import CommandFailed
from flespi_receiver.identity_upgrade import apply_identities
from flespi_receiver.migrate import migrate
from flespi_receiver.partitions import ensure_partitioned, maintain
from flespi_receiver.trigger import (
    CLEAR_CATCHING_UP,
    CLEAR_OFF_SINCE,
    apply_trigger,
    catch_up_pending,
    off_since,
)

if TYPE_CHECKING:
    from flespi_receiver.embedded import EmbeddedPostgres

log = structlog.get_logger("flespi_receiver.database")


@dataclass(frozen=True)
class Database:
    """Where the commands find PostgreSQL: the URL, and the embedded server when it is one."""

    url: str
    # set when the configured database is the embedded server
    embedded: EmbeddedPostgres | None = None

    @property
    def owned(self) -> bool:
        """This process started the embedded server (and stops it at the end)."""
        return self.embedded is not None and self.embedded.owned


@contextmanager
def open_database(settings: Settings, *, exclusive: bool = False) -> Iterator[Database]:
    """The configured database for as long as the block lasts.

    With `database.url` empty, that is the embedded server in `database.data_dir`: started
    here (and stopped at the end) when no other process owns the folder; when another does,
    its running server is used as it is, or with `exclusive` EmbeddedServerBusy is raised
    (exit 2: "already running, PID N").
    """
    url = settings.database.url.get_secret_value()
    if url:
        yield Database(url)
        return
    from flespi_receiver.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.database.data_dir)
    owner = server.claim()
    if owner is not None and not exclusive:
        shared = server.attach(owner)
        if shared is not None:
            log.debug("using the running embedded PostgreSQL", owner=owner, port=server.port)
            yield Database(shared, server)
            return
    log.info("starting embedded PostgreSQL", data_dir=str(server.data_dir))
    with server as embedded_url:
        yield Database(embedded_url, server)
    log.info("embedded PostgreSQL stopped")


def running_database_url(settings: Settings) -> str:
    """The URL to reach the configured database from outside the receiver.

    `database.url` as configured; for the embedded server, the URL of the one running now
    (its port changes at every start), or CommandFailed when it is not running.
    """
    url = settings.database.url.get_secret_value()
    if url:
        return url
    from flespi_receiver.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.database.data_dir)
    running = server.running_url()
    if running is None:
        raise CommandFailed(
            f"the embedded PostgreSQL in {server.data_dir} is not running: start the receiver "
            "(make run, or flespi-receiver serve) and ask again, or use flespi-receiver psql, "
            "which starts it when needed"
        )
    return running


async def connect(settings: Settings, dsn: str) -> asyncpg.Connection:
    """One connection with the receiver's session settings (search_path on its schema)."""
    # the web application's module is not needed by the commands that only read
    from flespi_receiver.app import connection_settings

    return await asyncpg.connect(dsn, server_settings=connection_settings(settings))


async def apply_migrations(settings: Settings, dsn: str) -> None:
    """Bring the schema to what the settings ask: migrations, partitions, columns, trigger."""
    conn = await connect(settings, dsn)
    try:
        applied = await migrate(conn, settings.database.schema_name)
        identities = {stream.name: stream.identity for stream in settings.streams}
        await apply_identities(conn, identities, progress=_upgrade_progress)
        await ensure_partitioned(conn, settings.partitioning)
        await maintain(conn, settings.partitioning)
        await apply_columns(conn, settings.columns)
        await apply_trigger(conn, settings.database)
        if settings.database.device_state and await catch_up_pending(conn):
            # the trigger was dropped: device_state was off, messages came without it
            async with conn.transaction():
                caught_up = await catch_up_states(
                    conn, settings.database.device_state_merge, await off_since(conn)
                )
                await conn.execute(f"{CLEAR_CATCHING_UP}; {CLEAR_OFF_SINCE}")
            log.info("device states caught up with the messages stored", states=caught_up)
        if turned := await apply_state_mode(conn, settings.database):
            log.info("device states kept in merge mode turned to latest mode", states=turned)
    finally:
        await conn.close()
    log.info(
        "schema up to date",
        schema=settings.database.schema_name,
        applied=[f"{m.version:04d}_{m.name}" for m in applied],
    )


def _upgrade_progress(stream: str, done: int, below: int) -> None:
    log.info("re-keying by content", stream=stream, rows_done=done, ids_left_below=below)
