"""Typed columns for chosen parameters: the `messages_typed` view and its expression indexes.

A view rather than stored columns: it needs no table rewrite and no work per insert, covers
rows stored before the column was configured, and changes with the configuration in one
statement. An optional expression index makes filters on a column as fast as on a real one;
on a partitioned table it is an index of the parent, which every partition gets.
"""

from __future__ import annotations

import asyncpg
import structlog

from flespi_receiver.config import ColumnSettings
from flespi_receiver.copy_in import Connection
from flespi_receiver.indexes import ensure_index

log = structlog.get_logger("flespi_receiver.columns")

VIEW = "messages_typed"
# what readers that take every row once page by (schema/0007_read_position.sql)
READ_POSITION_INDEX = "messages_xact_id"
CONVERSIONS = {
    "text": "json_text",
    "bigint": "json_bigint",
    "double precision": "json_float",
    "boolean": "json_boolean",
    "timestamptz": "json_epoch",
}
LOCK = "SELECT pg_advisory_xact_lock(hashtext('flespi_receiver:columns:' || current_schema()))"
EXISTING_INDEXES = """
SELECT indexname FROM pg_indexes
WHERE schemaname = current_schema() AND tablename = 'messages' AND indexname LIKE 'messages_typed_%'
"""


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def expression(column: ColumnSettings) -> str:
    """The SQL for one column: the parameter's value, converted, NULL when it does not fit."""
    return f"{CONVERSIONS[column.type]}(payload -> {_literal(column.parameter)})"


def view_sql(columns: list[ColumnSettings]) -> str:
    typed = "".join(f",\n       {expression(c)} AS {c.name}" for c in columns)
    return f"CREATE OR REPLACE VIEW {VIEW} AS\nSELECT messages.*{typed}\nFROM messages"


async def apply_columns(conn: Connection, columns: list[ColumnSettings]) -> None:
    """Make `messages_typed` and the indexes on messages match the configuration: those of
    the typed columns, and the one on xact_id that readers page by (docs/sql.md)."""
    async with conn.transaction():
        await conn.execute(LOCK)
        try:
            async with conn.transaction():
                await conn.execute(view_sql(columns))
        except asyncpg.InvalidTableDefinitionError:
            # a column was removed, renamed or retyped: only a new view will do
            await conn.execute(f"DROP VIEW {VIEW}")
            await conn.execute(view_sql(columns))
    existing = {row[0] for row in await conn.fetch(EXISTING_INDEXES)}
    await ensure_index(conn, READ_POSITION_INDEX, "xact_id")
    for column in columns:
        if column.index:
            await ensure_index(conn, f"messages_typed_{column.name}", f"({expression(column)})")
    wanted = {f"messages_typed_{c.name}" for c in columns if c.index}
    for stale in sorted(existing - wanted):
        log.warning("index no longer configured, kept; drop it by hand if unused", index=stale)
