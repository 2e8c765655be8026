"""What the read position (`messages.xact_id` and its index) costs the write path.

The same rows, written the receiver's two ways (binary COPY in a transaction for large
batches, one `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING` for small ones), into
two tables shaped like `messages`: one as it is, one without `xact_id` and its index. Batches
alternate between the two, the order swapping every batch, so that a busy moment on a shared
machine hits both alike; the ratio is the rate with the position over the rate without (1.0:
it costs nothing; 0.9: 10 % fewer messages per second).

    python -m flespi_receiver.bench_position [--database-url URL] [--count N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import time
from typing import Any

import asyncpg
import orjson

from flespi_receiver.bench import SCHEMA, copy_batches
from flespi_receiver.copy_in import INSERT_MESSAGES, insert_record
from flespi_receiver.emulator import batches_of, encode_messages, sample_messages
from flespi_receiver.fields import MESSAGE_COLUMNS
from flespi_receiver.messages import Message
from flespi_receiver.migrate import create_migrated_database

DATABASE = "flespi_bench_position"
WITH, WITHOUT = "with_position", "without_position"
TABLES = f"""
DROP TABLE IF EXISTS {SCHEMA}.{WITH}, {SCHEMA}.{WITHOUT};
CREATE TABLE {SCHEMA}.{WITH} (LIKE {SCHEMA}.messages INCLUDING ALL);
CREATE INDEX ON {SCHEMA}.{WITH} (xact_id);
CREATE TABLE {SCHEMA}.{WITHOUT} (LIKE {SCHEMA}.messages INCLUDING ALL);
ALTER TABLE {SCHEMA}.{WITHOUT} DROP COLUMN xact_id;
"""


# what the last round left: the tables and their indexes, in MB
SIZES = """
SELECT relname, pg_relation_size(oid) / 1048576.0 AS mb FROM pg_class
WHERE relname LIKE $1 OR relname LIKE $2 ORDER BY 1
"""


def insert_into(table: str) -> str:
    return INSERT_MESSAGES.replace("INSERT INTO messages", f"INSERT INTO {SCHEMA}.{table}")


async def copy_into(conn: asyncpg.Connection, table: str, data: bytes) -> None:
    async with conn.transaction():
        await conn.copy_to_table(
            table,
            schema_name=SCHEMA,
            source=io.BytesIO(data),
            columns=MESSAGE_COLUMNS,
            format="binary",
        )


async def insert_batch(
    conn: asyncpg.Connection, table: str, records: list[tuple[Any, ...]]
) -> None:
    arrays = [list(column) for column in zip(*records, strict=True)][1:]
    await conn.fetch(insert_into(table), records[0][0], *arrays)


async def one_round(conn: asyncpg.Connection, count: int, size: int, seed: int) -> float:
    """The rate with the position over the rate without, `count` messages in `size`s."""
    await conn.execute(f"TRUNCATE {SCHEMA}.{WITH}, {SCHEMA}.{WITHOUT}")
    await conn.execute("CHECKPOINT")
    encoded = encode_messages(sample_messages(count, seed=seed, start=seed * 10**7))
    seconds = {WITH: 0.0, WITHOUT: 0.0}
    if size > 50:
        work: list[Any] = copy_batches(encoded, size)
    else:
        work = [
            [insert_record("main", Message(raw, orjson.loads(raw))) for raw in batch]
            for batch in batches_of(encoded, size)
        ]
    for number, batch in enumerate(work):
        for table in (WITH, WITHOUT) if number % 2 else (WITHOUT, WITH):
            started = time.perf_counter()
            if size > 50:
                await copy_into(conn, table, batch)
            else:
                await insert_batch(conn, table, batch)
            seconds[table] += time.perf_counter() - started
    return seconds[WITHOUT] / seconds[WITH]


async def run(admin_url: str, count: int, rounds: int, sizes: list[int]) -> dict[str, Any]:
    url = await create_migrated_database(admin_url, DATABASE, SCHEMA)
    conn = await asyncpg.connect(url, server_settings={"synchronous_commit": "on"})
    summary: dict[str, Any] = {"count": count, "rounds": rounds, "batches": []}
    try:
        await conn.execute(TABLES)
        for size in sizes:
            messages = count if size > 50 else max(count // 20, size * 20)
            ratios = [await one_round(conn, messages, size, seed) for seed in range(rounds)]
            ratio = statistics.median(ratios)
            print(
                f"batch {size:>5}: {messages} messages, rate with/without the read position: "
                f"{ratio:.3f} (rounds {min(ratios):.3f}..{max(ratios):.3f})"
            )
            rounded = [round(r, 3) for r in ratios]
            batch = {"batch_size": size, "ratio": round(ratio, 3), "rounds": rounded}
            summary["batches"].append(batch)
        sizes_mb = await conn.fetch(SIZES, f"{WITH}%", f"{WITHOUT}%")
        summary["sizes_mb"] = {r["relname"]: round(float(r["mb"]), 2) for r in sizes_mb}
    finally:
        await conn.close()
    print(orjson.dumps(summary).decode())
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="an existing server (default: embedded)")
    parser.add_argument("--count", type=int, default=50_000, help="messages per round (COPY)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, action="append", dest="sizes")
    args = parser.parse_args()
    sizes = args.sizes or [10, 1000]  # the sizes reported are the last round's
    if args.database_url:
        asyncio.run(run(args.database_url, args.count, args.rounds, sizes))
        return
    from flespi_receiver.embedded import EmbeddedPostgres

    with EmbeddedPostgres(".data/bench-postgres") as url:
        asyncio.run(run(url, args.count, args.rounds, sizes))


if __name__ == "__main__":
    main()
