"""A body stored in part or whole before (flespi sends a batch again when a reply was lost, with
batch boundaries of its own) is stored window by window: the new messages once, the others
counted as duplicates, one NOTIFY, and about the memory the body took the first time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import orjson
import pytest
from test_connections import chunked_gzip_upload, serving
from test_database_state import refuse_in_trigger
from test_one_bad_message import BAD, listen, send

from flespi_receiver.resent import WINDOW

from conftest import ClientFactory
from helpers import REJECT_STREAM, count, flespi_message

# latest message per device by the rule device_state keeps (time, then identity)
EXPECTED_STATE = """
SELECT DISTINCT ON (ident) ident, id FROM messages
ORDER BY ident, ts DESC NULLS LAST, message_hash DESC
"""


def array(messages: list[bytes]) -> bytes:
    return b"[" + b",".join(messages) + b"]"


@pytest.mark.parametrize("how", ["trickled", "chunked-gzip"])
async def test_a_body_stored_in_part_before_stores_only_its_new_messages(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str, how: str
) -> None:
    client = await receiver()
    size = 2 * WINDOW + 500  # three windows
    # devices send several messages each, so the state is a real fold
    good = [orjson.dumps(flespi_message(i, ident=f"dev{i % 700}")) for i in range(size)]
    earlier = good[: size // 2]
    bad, reason = BAD["duplicate-key"]
    status, reply, _ = await send(client, array(earlier), how)
    assert (status, reply) == (200, {"stored": len(earlier), "duplicates": 0, "rejected": 0})
    first_ids = {r[0] for r in await db.fetch("SELECT id FROM messages")}

    # sent again with the rest, a bad message and a copy of one message in the body
    body = array([*good[:100], bad, *good[100:], good[5]])
    listener, notes = await listen(database_url)
    try:
        status, reply, path = await send(client, body, how)
        new = size - len(earlier)
        assert (status, reply, path) == (
            200,
            {"stored": new, "duplicates": len(earlier) + 1, "rejected": 1},
            "windows",
        )
        rows = await db.fetch("SELECT id, payload::text AS p FROM messages ORDER BY id")
        assert [orjson.loads(r["p"]) for r in rows] == [orjson.loads(g) for g in good]
        new_ids = [r["id"] for r in rows if r["id"] not in first_ids]
        assert len(new_ids) == new
        quarantined = await db.fetch("SELECT raw, reason FROM rejected_messages")
        assert [tuple(r) for r in quarantined] == [(bad, reason)]
        # one NOTIFY for the batch, for what it stored
        note = await asyncio.wait_for(notes.get(), 5)
        assert (note["count"], note["first_id"], note["last_id"]) == (
            new,
            min(new_ids),
            max(new_ids),
        )
        await asyncio.sleep(0.1)
        assert notes.empty()
        state = await db.fetch("SELECT ident, message_id FROM device_state ORDER BY ident")
        expected = await db.fetch(EXPECTED_STATE)
        assert [tuple(r) for r in state] == [tuple(r) for r in expected]

        # and once more: nothing new, nothing stored, nothing notified
        status, reply, path = await send(client, body, how)
        assert (status, reply, path) == (
            200,
            {"stored": 0, "duplicates": size + 1, "rejected": 1},
            "windows",
        )
        assert await count(db) == size
        assert await count(db, "rejected_messages") == 1
        await asyncio.sleep(0.1)
        assert notes.empty()
    finally:
        await listener.close()


@pytest.mark.parametrize("stored_before", [0, 300])
async def test_a_message_postgresql_refuses_costs_only_itself(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str, stored_before: int
) -> None:
    client = await receiver()
    good = [orjson.dumps(flespi_message(i)) for i in range(2500)]
    if stored_before:
        status, _, _ = await send(client, array(good[:stored_before]), "trickled")
        assert status == 200
    await refuse_in_trigger(
        db, "RAISE EXCEPTION 'device % is blocked', NEW.ident", "NEW.device_id = 502450"
    )
    listener, notes = await listen(database_url)
    try:
        status, reply, path = await send(client, array(good), "trickled")
        # only the refused message's window went message by message; the body stays one batch
        new = len(good) - stored_before
        assert (status, reply, path) == (
            200,
            {"stored": new - 1, "duplicates": stored_before, "rejected": 1},
            "windows",
        )
        (reason,) = [r[0] for r in await db.fetch("SELECT reason FROM rejected_messages")]
        assert reason.startswith("PostgreSQL refused it: device 352625333202450 is blocked")
        assert await count(db) == len(good) - 1
        note = await asyncio.wait_for(notes.get(), 5)
        assert note["count"] == new - 1
        # sent again: the refused message was quarantined before, the rest is stored
        status, reply, path = await send(client, array(good), "trickled")
        assert (status, reply, path) == (
            200,
            {"stored": 0, "duplicates": len(good) - 1, "rejected": 1},
            "windows",
        )
        assert await count(db, "rejected_messages") == 1
    finally:
        await listener.close()


async def test_a_refusing_stream_answers_422_for_a_message_postgresql_refuses(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(streams=REJECT_STREAM)
    good = [orjson.dumps(flespi_message(i)) for i in range(600)]
    await refuse_in_trigger(
        db, "RAISE EXCEPTION 'device % is blocked', NEW.ident", "NEW.device_id = 500450"
    )
    status, reply, _ = await send(client, array(good), "trickled")
    assert status == 422
    assert "device 352625333200450 is blocked" in reply["error"]
    assert await count(db) == 0


@pytest.mark.parametrize("size", [20, 600])
async def test_a_422_for_a_refused_row_quotes_no_payload_in_the_reply_or_the_log(
    receiver: ClientFactory, db: asyncpg.Connection, size: int
) -> None:
    # a CHECK constraint's DETAIL quotes the failing row, payload and all
    client = await receiver(streams=REJECT_STREAM)
    await db.execute(
        "ALTER TABLE messages ADD CONSTRAINT no_refuse CHECK (ident <> 'REFUSE') NOT VALID"
    )
    secret = "payload-only-text-7f3a"
    messages = [
        orjson.dumps(flespi_message(i, note=secret, ident="REFUSE" if i == 5 else None))
        for i in range(size)
    ]
    how = "trickled" if size > 100 else "whole"
    status, reply, _ = await send(client, array(messages), how)
    assert status == 422
    # the reply's error is also the reason of the request's `batch` log line
    assert "no_refuse" in reply["error"]
    assert secret not in reply["error"]
    assert await count(db) == 0


async def test_a_refusing_stream_still_refuses_a_resent_body_with_bad_content(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(streams=REJECT_STREAM)
    good = [orjson.dumps(flespi_message(i)) for i in range(300)]
    assert (await send(client, array(good), "trickled"))[0] == 200
    bad, reason = BAD["nul"]
    status, reply, _ = await send(client, array([*good, bad]), "trickled")
    assert status == 422
    assert reason in reply["error"]
    assert await count(db) == 300
    assert await count(db, "rejected_messages") == 0


async def test_a_resent_body_or_one_with_a_refused_message_costs_about_a_first_one(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    size = 8000
    body = orjson.dumps([flespi_message(i) for i in range(size)])  # ~3 MB
    async with serving(tmp_path, database_url, f"max_body_size = {64 * 1024 * 1024}") as served:
        warm = orjson.dumps([flespi_message(-1)] * 100)
        assert await asyncio.to_thread(chunked_gzip_upload, served.port, warm) == 200
        served.reset_peak()
        before = served.memory_kib()
        costs = []
        for _ in range(2):
            assert await asyncio.to_thread(chunked_gzip_upload, served.port, body) == 200
            costs.append((served.memory_kib("VmHWM") - before) * 1024 / len(body))
        # and a body holding a message PostgreSQL refuses (it went message by message: 7x)
        await db.execute(
            "ALTER TABLE messages ADD CONSTRAINT no_refuse CHECK (ident <> 'REFUSE') NOT VALID"
        )
        refused = orjson.dumps(
            [*(flespi_message(size + i) for i in range(size)), {"ident": "REFUSE"}]
        )
        served.reset_peak()
        before = served.memory_kib()
        assert await asyncio.to_thread(chunked_gzip_upload, served.port, refused) == 200
        costs.append((served.memory_kib("VmHWM") - before) * 1024 / len(refused))
    assert await count(db) == 2 * size + 1
    assert await count(db, "rejected_messages") == 1
    # stored first, then sent again (each message decoded apart, this was 6.7x)
    assert costs[1] <= 4, costs
    assert costs[2] <= 4, costs
