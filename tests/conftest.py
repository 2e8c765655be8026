"""One real PostgreSQL for the session, a fresh database per test cloned from a migrated template.

Set FLESPI_RECEIVER_TEST_DATABASE_URL to run against an existing server (any database on it;
the tests create and drop their own databases); otherwise an embedded server is started.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from flespi_receiver.app import create_app
from flespi_receiver.config import Settings, load_settings
from flespi_receiver.embedded import EmbeddedPostgres
from flespi_receiver.migrate import create_migrated_database, with_database

TEST_URL_ENV = "FLESPI_RECEIVER_TEST_DATABASE_URL"
TEMPLATE = "flespi_receiver_test_template"
SCHEMA = "flespi"


@dataclass
class Server:
    """The PostgreSQL the tests use; `embedded` is set when the tests may stop and start it."""

    url: str
    embedded: EmbeddedPostgres | None


async def _prepare_template(url: str) -> None:
    await create_migrated_database(url, TEMPLATE, SCHEMA)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    external = os.environ.get(TEST_URL_ENV)
    if external:
        asyncio.run(_prepare_template(external))
        yield Server(external, None)
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres") / "data")
    url = server.start()
    # a SIGTERM (a CI timeout, a killed run) unwinds like Ctrl-C, so the server is stopped too
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        asyncio.run(_prepare_template(url))
        yield Server(url, server)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()


@pytest.fixture
def embedded_server(pg_server: Server) -> EmbeddedPostgres:
    if pg_server.embedded is None:
        pytest.skip("stops and starts the server: runs only against the embedded PostgreSQL")
    return pg_server.embedded


@pytest.fixture
async def database_url(pg_server: Server) -> AsyncIterator[str]:
    """A fresh database with the schema applied, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_server.url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    finally:
        await admin.close()
    yield with_database(pg_server.url, name)
    admin = await asyncpg.connect(pg_server.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, on the receiver's schema."""
    conn = await asyncpg.connect(database_url, server_settings={"search_path": SCHEMA})
    yield conn
    await conn.close()


STREAM_TOML = """
[[streams]]
name = "main"
path = "/flespi"
authorization = ["Bearer test-token", "Bearer next-token"]
"""

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, database_url: str) -> SettingsFactory:
    """Settings built by the real loader from a TOML file written for the test."""

    def build(streams: str = STREAM_TOML, extra: str = "", database: str = "") -> Settings:
        """`extra` goes into [server], `database` into [database]."""
        path = tmp_path / f"config-{uuid.uuid4().hex[:8]}.toml"
        path.write_text(
            f'[server]\nport = 0\n{extra}\n[database]\nurl = "{database_url}"\n'
            f'schema = "{SCHEMA}"\n{database}\n{streams}'
        )
        return load_settings(path)

    return build


Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
def receiver(
    # the database is requested first so that it is dropped after the app has closed its pool
    make_settings: SettingsFactory,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> ClientFactory:
    """Start the real application on 127.0.0.1 and return an HTTP client for it."""

    async def start(**kwargs: Any) -> TestClient[web.Request, web.Application]:
        settings = make_settings(**kwargs)
        return await aiohttp_client(create_app(settings, settings.database.url.get_secret_value()))

    return start
