"""Schema migrations: applied in order, once, recorded, safe from several receivers at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from flespi_receiver.migrate import migrate, migrations, pending_migrations, with_database

from conftest import Server


@pytest.fixture
async def empty_database(pg_server: Server) -> AsyncIterator[str]:
    name = f"m_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_server.url)
    await admin.execute(f"CREATE DATABASE {name}")
    yield with_database(pg_server.url, name)
    await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    await admin.close()


async def test_migrate_applies_everything_once(empty_database: str) -> None:
    conn = await asyncpg.connect(empty_database)
    try:
        assert await pending_migrations(conn, "telemetry") == migrations()
        first = await migrate(conn, "telemetry")
        assert [m.version for m in first] == [m.version for m in migrations()]
        assert await migrate(conn, "telemetry") == []
        assert await pending_migrations(conn, "telemetry") == []
        recorded = await conn.fetch("SELECT version, name FROM telemetry.schema_migrations")
        assert [(r["version"], r["name"]) for r in recorded] == [
            (m.version, m.name) for m in migrations()
        ]
        # every table lives in the configured schema, none in public
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema IN ('telemetry', 'public') ORDER BY 2"
        )
        assert {r["table_schema"] for r in tables} == {"telemetry"}
        assert {r["table_name"] for r in tables} >= {"messages", "rejected_messages"}
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_once(empty_database: str) -> None:
    conns = [await asyncpg.connect(empty_database) for _ in range(6)]
    try:
        results = await asyncio.gather(*(migrate(c, "flespi") for c in conns))
        assert sorted(len(r) for r in results) == [0] * 5 + [len(migrations())]
        count = await conns[0].fetchval("SELECT count(*) FROM flespi.schema_migrations")
        assert count == len(migrations())
    finally:
        for c in conns:
            await c.close()


def test_migration_files_are_numbered_without_gaps() -> None:
    assert [m.version for m in migrations()] == list(range(1, len(migrations()) + 1))
