"""Partition maintenance beside writers: nothing acknowledged is dropped, nothing fails a start.

Two receivers as their own processes on one database, a batch body that arrives slowly (its
rows written but not committed while the other side acts), and the exact interleavings that
used to lose rows or stop a start.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flespi_receiver.config import PartitioningSettings
from flespi_receiver.embedded import free_port
from flespi_receiver.partitions import ensure_partitioned, maintain, partitions

from conftest import ClientFactory
from helpers import (
    AUTH,
    append_toml,
    config_file,
    count,
    finished,
    flespi_message,
    receiver_process,
    reply_on,
    send_partial_body,
    start_command,
    wait_for_lock_wait,
    wait_for_writer,
    wait_until_serving,
)


def batch_body(size: int = 200, at: datetime | None = None) -> bytes:
    """A body over 64 KB (stored while it arrives), its messages at `at` if given."""
    extra = {} if at is None else {"timestamp": at.timestamp()}
    body = orjson.dumps([flespi_message(i, **extra) for i in range(size)])
    assert len(body) > 64 * 1024
    return body


def day_partition(moment: datetime) -> str:
    return f"messages_p{moment:%Y%m%d}"


async def partition_rows(db: asyncpg.Connection) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT tableoid::regclass::text AS part, count(*) FROM messages GROUP BY 1"
    )
    return {r["part"]: r["count"] for r in rows}


async def test_conversion_waits_for_a_batch_being_written_and_refuses(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    plain = config_file(tmp_path, database_url, port, "plain")
    monthly = append_toml(
        config_file(tmp_path, database_url, free_port(), "monthly"),
        '[partitioning]\ninterval = "month"\n',
    )
    body = batch_body()
    with receiver_process(plain) as process:
        await wait_until_serving(port, process)
        # a fresh, empty messages: the batch's rows are written but not yet committed
        raw = await asyncio.to_thread(send_partial_body, port, len(body), body[:60_000])
        await wait_for_writer(db)
        converting = await start_command("migrate", monthly)
        await wait_for_lock_wait(db)  # the conversion waits for the batch, deciding nothing
        raw.sendall(body[60_000:])
        reply = await reply_on(raw)
        assert reply.startswith(b"HTTP/1.1 200")
        assert b'"stored":200' in reply
        status, stderr = await finished(converting)
    assert status == 2
    assert "already holds messages" in stderr
    assert "docs/scaling.md" in stderr
    assert await count(db) == 200
    assert await db.fetchval("SELECT relkind FROM pg_class WHERE relname = 'messages'") == b"r"
    # device_state points at messages that exist
    assert await db.fetchval(
        "SELECT count(*) FROM device_state s JOIN messages m ON m.id = s.message_id"
    ) == await count(db, "device_state")


async def test_a_partition_made_while_a_batch_writes_into_its_range(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    daily = '[partitioning]\ninterval = "day"\nahead = 1\n'
    first = append_toml(config_file(tmp_path, database_url, port, "first"), daily)
    # the second receiver makes one partition more: the batch's day
    second = append_toml(
        config_file(tmp_path, database_url, free_port(), "second"),
        '[partitioning]\ninterval = "day"\nahead = 2\n',
    )
    later = datetime.now(UTC) + timedelta(days=2)
    body = batch_body(at=later)
    with receiver_process(first) as process:
        await wait_until_serving(port, process)
        assert day_partition(later) not in await partition_rows(db)
        raw = await asyncio.to_thread(send_partial_body, port, len(body), body[:60_000])
        await wait_for_writer(db, "messages_default")  # no partition for that day yet
        starting = await start_command("migrate", second)
        await wait_for_lock_wait(db)
        raw.sendall(body[60_000:])
        reply = await reply_on(raw)
        assert reply.startswith(b"HTTP/1.1 200")
        status, stderr = await finished(starting)
    assert status == 0, stderr
    # the batch's rows moved out of the default partition into their day, none lost
    assert await partition_rows(db) == {day_partition(later): 200}


async def test_upkeep_that_cannot_lock_now_gives_up_harmlessly_and_succeeds_later(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    monthly = PartitioningSettings(interval="month", ahead=1)
    await ensure_partitioned(db, monthly)
    await maintain(db, monthly)
    config = append_toml(
        config_file(tmp_path, database_url, port), '[partitioning]\ninterval = "month"\nahead = 1\n'
    )
    later = datetime.now(UTC) + timedelta(days=150)
    body = batch_body(at=later)
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        raw = await asyncio.to_thread(send_partial_body, port, len(body), body[:60_000])
        await wait_for_writer(db, "messages_default")
        # the upkeep of a later day, as the hourly one would run it: it must not wait long
        assert not await maintain(db, monthly, now=later, patience=0.5)
        raw.sendall(body[60_000:])
        assert (await reply_on(raw)).startswith(b"HTTP/1.1 200")
        assert await partition_rows(db) == {"messages_default": 200}
        assert await maintain(db, monthly, now=later)  # tried again: done
    assert await partition_rows(db) == {f"messages_p{later:%Y%m}01": 200}


async def test_receivers_that_disagree_on_partitioning_are_told(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    monthly = append_toml(
        config_file(tmp_path, database_url, port, "monthly"),
        '[partitioning]\ninterval = "month"\nretention = "1 year"\n',
    )
    daily = append_toml(
        config_file(tmp_path, database_url, free_port(), "daily"),
        '[partitioning]\ninterval = "day"\n',
    )
    shorter = append_toml(
        config_file(tmp_path, database_url, free_port(), "shorter"),
        '[partitioning]\ninterval = "month"\nretention = "30 days"\n',
    )
    with receiver_process(monthly) as process:
        await wait_until_serving(port, process)
        status, stderr = await finished(await start_command("migrate", daily))
        assert status == 2
        assert "disagree on [partitioning]" in stderr
        assert 'interval "month", retention 8760 hours' in stderr
        # another retention: it starts, says so, and drops nothing the other one keeps
        status, stderr = await finished(await start_command("migrate", shorter))
        assert status == 0, stderr
        assert "partitioning disagreement" in stderr
    # with the other receiver gone, nobody disagrees any more
    status, stderr = await finished(await start_command("migrate", shorter))
    assert (status, "disagreement" in stderr) == (0, False)


MONTHS_AHEAD = st.integers(min_value=-2, max_value=14)  # a batch's month, from now
UNIQUE = itertools.count()


async def trickled(body: bytes, pause: float) -> AsyncIterator[bytes]:
    """The body in pieces of 8 KB with a pause between them: a slow sender."""
    for start in range(0, len(body), 8192):
        yield body[start : start + 8192]
        await asyncio.sleep(pause)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(
        st.tuples(MONTHS_AHEAD, st.integers(1, 240), st.sampled_from([0.0, 0.0, 0.02])),
        min_size=1,
        max_size=6,
    ),
    upkeeps=st.lists(st.tuples(MONTHS_AHEAD, st.floats(0, 0.4)), min_size=1, max_size=3),
)
async def test_upkeep_at_any_moment_beside_any_batches_loses_nothing(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
    batches: list[tuple[int, int, float]],
    upkeeps: list[tuple[int, float]],
) -> None:
    monthly = PartitioningSettings(interval="month", ahead=1)
    await ensure_partitioned(db, monthly)  # the first example converts, the others find it done
    await db.execute("TRUNCATE messages")
    client = await receiver()
    now = datetime.now(UTC)

    async def send(months: int, size: int, pause: float) -> int:
        at = (now + timedelta(days=31 * months)).timestamp()
        batch = [flespi_message(next(UNIQUE), timestamp=at) for _ in range(size)]
        body = orjson.dumps(batch)
        headers = {**AUTH, "Content-Length": str(len(body))}
        reply = await client.post(
            "/flespi", data=trickled(body, pause) if pause else body, headers=headers
        )
        assert reply.status == 200
        stored: int = (await reply.json())["stored"]
        return stored

    async def upkeep(months: int, start: float) -> bool:
        await asyncio.sleep(start)
        conn = await asyncpg.connect(database_url, server_settings={"search_path": "flespi"})
        try:
            return await maintain(conn, monthly, now=now + timedelta(days=31 * months))
        finally:
            await conn.close()

    try:
        sent = [send(*batch) for batch in batches]
        results = await asyncio.gather(*sent, *(upkeep(*u) for u in upkeeps))
    finally:
        await client.close()
    stored, done = results[: len(batches)], results[len(batches) :]
    assert all(done)  # no upkeep failed because of the batches
    assert await count(db) == sum(stored) == sum(size for _, size, _ in batches)
    # every row is in the partition that covers its time, the default one only if none does
    found = await partitions(db)
    for row in await db.fetch(
        "SELECT partition_ts, tableoid::regclass::text AS part FROM messages"
    ):
        covering = [
            p.name for p in found if not p.is_default and p.starts <= row["partition_ts"] < p.ends
        ]
        assert [row["part"]] == (covering or ["messages_default"])
