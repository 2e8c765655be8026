"""Backfill from flespi's REST API, together with the stream: every message stored once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from flespi_rest import TOKEN, FlespiRest, flespi_rest

from flespi_receiver.backfill import BackfillRange, backfill
from flespi_receiver.emulator import StreamEmulator, encode_messages, sample_messages
from flespi_receiver.errors import ConfigError
from flespi_receiver.fields import MessageFields, names_in
from flespi_receiver.flespi_api import FlespiApi, FlespiTokenRefused, FlespiUnavailable, RetryPolicy

from conftest import SCHEMA, STREAM_TOML, ClientFactory
from helpers import count

SESSION = {"search_path": SCHEMA}
FAST = RetryPolicy(attempts=4, backoff_start=0.01, backoff_max=0.05, timeout=0.5)
DEVICES = (7001, 7002, 7003)
EVERYTHING = (datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC))
# the stream keyed by content, as a backfill needs it
CONTENT_STREAM = STREAM_TOML + 'identity = "content"\n'
CONTENT_FIELDS = MessageFields(names_in("dotted"), content_identity=True)


def device_messages(first: int, last: int) -> list[dict[str, Any]]:
    """Messages `first`..`last - 1` of three devices, as a device subscription delivers them."""
    messages = sample_messages(last - first, seed=first, start=first)
    for number, message in enumerate(messages, start=first):
        device = DEVICES[number % 3]
        message.update({"device.id": device, "ident": f"ident-{device}"})
    return messages


def by_number(first: int, last: int) -> list[dict[str, Any]]:
    """The same messages every time they are asked for (sample_messages is seeded by start)."""
    return [device_messages(n, n + 1)[0] for n in range(first, last)]


@pytest.fixture
async def rest() -> AsyncIterator[FlespiRest]:
    async with flespi_rest(FlespiRest()) as state:
        yield state


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url, server_settings=SESSION)
    yield connection
    await connection.close()


async def run_backfill(
    conn: asyncpg.Connection,
    rest: FlespiRest,
    *,
    page_size: int = 25,
    fields: MessageFields = CONTENT_FIELDS,
    **api: Any,
) -> Any:
    async with aiohttp.ClientSession() as session:
        client = FlespiApi(
            rest.url, api.pop("token", TOKEN), session, api.pop("policy", FAST), **api
        )
        target = BackfillRange("main", "all", *EVERYTHING)
        return await backfill(conn, client, target, fields, page_size=page_size)


async def deliver(receiver: ClientFactory, messages: list[dict[str, Any]]) -> None:
    client = await receiver(streams=CONTENT_STREAM)
    emulator = StreamEmulator(str(client.make_url("/flespi")), authorization="Bearer test-token")
    await emulator.run(encode_messages(messages), batch_size=40)


async def test_backfill_and_stream_store_every_message_once(
    receiver: ClientFactory, db: asyncpg.Connection, conn: asyncpg.Connection, rest: FlespiRest
) -> None:
    # the stream delivered 0..199; flespi's storage holds 100..299, spelled its own way
    await deliver(receiver, by_number(0, 200))
    for message in by_number(100, 300):
        rest.add(message["device.id"], message)
    summary = await run_backfill(conn, rest)
    # the last message of a full page comes again first on the next: counted once
    assert (summary.fetched, summary.stored, summary.duplicates) == (200, 100, 100)
    assert await count(db) == 300
    assert await db.fetchval("SELECT count(DISTINCT payload) FROM messages") == 300
    # device_state follows what the backfill stored: each device's latest message
    states = await db.fetch("SELECT ident, ts, payload IS NOT NULL AS shown FROM device_state")
    latest = await db.fetch("SELECT ident, max(ts) AS ts, true AS shown FROM messages GROUP BY 1")
    assert {tuple(r) for r in states} == {tuple(r) for r in latest}
    # pages: from moves to the last timestamp of the page before, to stays, both inclusive
    first = [r for r in rest.requests if r["device"] == DEVICES[0]]
    assert first[0]["from"] == EVERYTHING[0].timestamp()
    stored = rest.messages[DEVICES[0]]  # 66 messages: pages 1-25, 25-49, 49-66
    assert [r["from"] for r in first[1:]] == [stored[24]["timestamp"], stored[48]["timestamp"]]
    assert all(r["to"] == EVERYTHING[1].timestamp() and r["count"] == 25 for r in first)

    # flespi's stream re-sends part of it as it spelled it: the stream agrees, nothing new
    await deliver(receiver, by_number(250, 300))
    assert await count(db) == 300

    # a rerun of the finished range asks flespi for nothing and stores nothing
    asked = len(rest.requests)
    again = await run_backfill(conn, rest)
    assert (again.stored, again.skipped_devices, len(rest.requests)) == (0, 3, asked)
    done = await db.fetch("SELECT done, stored FROM backfill_progress ORDER BY device_id")
    assert [r["done"] for r in done] == [True] * 3
    assert sum(r["stored"] for r in done) == 100


async def test_channel_stream_and_device_backfill_meet(
    receiver: ClientFactory, db: asyncpg.Connection, conn: asyncpg.Connection, rest: FlespiRest
) -> None:
    """A stream subscribed to the channel has no device.* fields; the device storage has."""
    from_channel = [
        {k: v for k, v in m.items() if not k.startswith("device.")} for m in by_number(0, 60)
    ]
    await deliver(receiver, from_channel)
    for message in by_number(0, 90):
        rest.add(message["device.id"], message)
    summary = await run_backfill(conn, rest)
    assert (summary.stored, summary.duplicates) == (30, 60)
    assert await count(db) == 90
    assert await db.fetchval("SELECT count(*) FROM messages WHERE device_id IS NULL") == 60


async def test_rate_limit_errors_and_a_slow_page_are_waited_out(
    db: asyncpg.Connection, conn: asyncpg.Connection, rest: FlespiRest
) -> None:
    for message in by_number(0, 30):
        rest.add(message["device.id"], message)
    rest.faults = [429, 503, "slow", None, 502]
    rest.slow_seconds = 2.0  # the client waits 0.5
    waits: list[tuple[str, float]] = []
    summary = await run_backfill(conn, rest, on_retry=lambda r, s: waits.append((r, s)))
    assert summary.stored == 30
    assert await count(db) == 30
    reasons = [reason for reason, _ in waits]
    assert reasons[0].startswith("HTTP 429: Too Many Requests")
    assert waits[0][1] == 1.0  # Retry-After
    assert reasons[1].startswith("HTTP 503")
    assert reasons[2] == "TimeoutError"
    assert reasons[3].startswith("HTTP 502")


async def test_an_unavailable_api_gives_up_and_the_next_run_resumes(
    db: asyncpg.Connection, conn: asyncpg.Connection, rest: FlespiRest
) -> None:
    for message in by_number(0, 60):
        rest.add(message["device.id"], message)
    rest.faults = [None, 503, 503, 503, 503]  # the first page, then four failures in a row
    with pytest.raises(FlespiUnavailable, match="run again to resume"):
        await run_backfill(conn, rest, page_size=10)
    assert await count(db) == 10
    summary = await run_backfill(conn, rest, page_size=10)
    assert summary.stored == 50
    assert await count(db) == 60


async def test_a_wrong_token_is_refused_clearly(conn: asyncpg.Connection, rest: FlespiRest) -> None:
    rest.add(DEVICES[0], by_number(0, 1)[0])
    with pytest.raises(FlespiTokenRefused, match="refused the token") as refused:
        await run_backfill(conn, rest, token="not-the-token")
    assert "not-the-token" not in str(refused.value)
    assert refused.value.exit_code == 2


async def test_a_stream_keyed_by_text_is_not_backfilled(
    conn: asyncpg.Connection, rest: FlespiRest
) -> None:
    rest.add(DEVICES[0], by_number(0, 1)[0])
    with pytest.raises(ConfigError, match='set identity = "content"'):
        await run_backfill(conn, rest, fields=MessageFields(names_in("dotted")))
    assert rest.requests == []


def test_flespi_spells_differently() -> None:
    """The stand-in really does spell messages unlike the stream (else the tests prove little)."""
    from flespi_rest import respell

    message = by_number(5, 6)[0] | {"altitude": 120.0, "path": "a/b"}
    spelled = respell(message).encode()
    assert spelled != orjson.dumps(message)
    assert orjson.loads(spelled) == message
    assert b"\\u" in spelled
    assert b"\\/" in spelled
    assert b"e+02" in spelled
