"""The schema keeps the rules Citus and TimescaleDB set for unique constraints (docs/scaling.md).

Neither server can be installed here, so the rules are checked on the schema itself:
distribution by `stream` needs `stream` in every unique constraint; a hypertable on
`partition_ts` needs it NOT NULL and in every unique constraint of `messages`.
"""

from __future__ import annotations

import asyncpg
import pytest

from flespi_receiver.config import PartitioningSettings
from flespi_receiver.partitions import ensure_partitioned

UNIQUE_INDEXES = """
SELECT t.relname AS table_name, i.relname AS index_name, x.indisprimary AS primary_key,
       array_agg(a.attname ORDER BY k.n) AS columns
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace s ON s.oid = t.relnamespace
CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, n)
JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
WHERE s.nspname = 'flespi' AND x.indisunique
  AND t.relname IN ('messages', 'device_latest', 'rejected_messages')
GROUP BY t.relname, i.relname, x.indisprimary
"""


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
async def test_unique_constraints_hold_distribution_and_time_columns(
    db: asyncpg.Connection, partitioned: bool
) -> None:
    if partitioned:
        await ensure_partitioned(db, PartitioningSettings(interval="month"))
    indexes = await db.fetch(UNIQUE_INDEXES)
    tables = {r["table_name"] for r in indexes}
    assert tables == {"messages", "device_latest", "rejected_messages"}
    for index in indexes:
        assert "stream" in index["columns"], f"Citus: {index['index_name']} lacks stream"
        if index["table_name"] == "messages":
            assert "partition_ts" in index["columns"], f"TimescaleDB: {index['index_name']}"
            assert not index["primary_key"]
    not_null = await db.fetchval(
        "SELECT attnotnull FROM pg_attribute "
        "WHERE attrelid = 'flespi.messages'::regclass AND attname = 'partition_ts'"
    )
    assert not_null
    # exactly once rests on a unique key the database enforces
    keys = [tuple(r["columns"]) for r in indexes if r["table_name"] == "messages"]
    assert ("stream", "partition_ts", "message_hash") in keys
