"""Applying the numbered .sql files of `schema/` in order, once each, under an advisory lock."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from flespi_receiver.copy_in import Connection

CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
APPLIED_VERSIONS = "SELECT version FROM schema_migrations"
RECORD_MIGRATION = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"
# One lock per schema, held until commit: concurrent receivers wait, then find nothing to do.
LOCK_SCHEMA = "SELECT pg_advisory_xact_lock(hashtext('flespi_receiver:' || $1))"
SCHEMA_EXISTS = "SELECT to_regnamespace($1) IS NOT NULL"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with the package, in the order it applies."""
    found = []
    for entry in resources.files("flespi_receiver.schema").iterdir():
        if entry.name.endswith(".sql"):
            version, _, rest = entry.name.partition("_")
            found.append(Migration(int(version), rest.removesuffix(".sql"), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # two files with one number would record one version and skip the other
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"schema/ holds two migrations with one number: {versions}")
    return found


async def pending_migrations(conn: Connection, schema: str) -> list[Migration]:
    """The migrations not yet applied to `schema` (all of them when it doesn't exist)."""
    if not await conn.fetchval(SCHEMA_EXISTS, schema):
        return migrations()
    async with conn.transaction():
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
            return migrations()
        applied = {row[0] for row in await conn.fetch(APPLIED_VERSIONS)}
    return [m for m in migrations() if m.version not in applied]


async def migrate(conn: Connection, schema: str) -> list[Migration]:
    """Apply what is pending to `schema`, creating it if needed; return what was applied."""
    applied_now = []
    async with conn.transaction():
        await conn.execute(LOCK_SCHEMA, schema)
        # the schema name is a validated identifier (config.py); identifiers can't be parameters
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        await conn.execute(CREATE_MIGRATIONS_TABLE)
        applied = {row[0] for row in await conn.fetch(APPLIED_VERSIONS)}
        for migration in migrations():
            if migration.version not in applied:
                await conn.execute(migration.sql)
                await conn.execute(RECORD_MIGRATION, migration.version, migration.name)
                applied_now.append(migration)
    return applied_now


def with_database(url: str, database: str) -> str:
    """The same server URL, naming another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


async def create_empty_database(admin_url: str, database: str) -> str:
    """Drop and create `database` (a name of our own, not user input), empty; its URL."""
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {database}")
    finally:
        await admin.close()
    return with_database(admin_url, database)


async def create_migrated_database(admin_url: str, database: str, schema: str) -> str:
    """create_empty_database, migrated; its URL: the fresh databases of the benchmark and the
    tests' template."""
    url = await create_empty_database(admin_url, database)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, schema)
    finally:
        await conn.close()
    return url
