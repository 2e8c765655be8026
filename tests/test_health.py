"""Probes: /healthz answers while the process serves, /readyz only when batches can be stored."""

from __future__ import annotations

import asyncpg

from conftest import ClientFactory


async def test_healthy_and_ready_with_the_database_up(receiver: ClientFactory) -> None:
    client = await receiver()
    health = await client.get("/healthz")
    assert (health.status, await health.json()) == (200, {"status": "ok"})
    ready = await client.get("/readyz")
    assert (ready.status, await ready.json()) == (200, {"status": "ready"})


async def test_not_ready_when_a_migration_is_missing(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    await db.execute("DELETE FROM schema_migrations")
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "0001_messages" in (await ready.json())["error"]
    assert (await client.get("/healthz")).status == 200
