"""Replaying the quarantine: a user fixes what made PostgreSQL refuse messages, then replays."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg
import orjson

from flespi_receiver.fields import DEFAULT_FIELDS
from flespi_receiver.replay import ReplaySelection, ReplaySummary, replay_rejected

from conftest import SCHEMA, ClientFactory
from helpers import AUTH, SCRIPT, config_file, count, flespi_message

SESSION = {"search_path": SCHEMA, "flespi_receiver.notify_channel": "flespi_messages"}
# a rule the user adds, and later finds too strict
SPEED_RULE = (
    "ALTER TABLE messages ADD CONSTRAINT speed_limit "
    "CHECK ((payload->>'position.speed')::numeric < 100)"
)


async def quarantine_fast_messages(
    receiver: ClientFactory, db: asyncpg.Connection, count_: int
) -> list[dict[str, object]]:
    """`count_` messages through the stream, those at 100 km/h or more refused by the rule."""
    await db.execute(SPEED_RULE)
    client = await receiver()
    batch = [flespi_message(i, **{"position.speed": 50 + i % 100}) for i in range(count_)]
    reply = await client.post("/flespi", data=orjson.dumps(batch), headers=AUTH)
    assert reply.status == 200
    result = await reply.json()
    assert result["rejected"] == sum(1 for m in batch if m["position.speed"] >= 100)  # type: ignore[operator]
    return batch


async def test_replay_after_dropping_the_constraint_moves_the_messages(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str
) -> None:
    batch = await quarantine_fast_messages(receiver, db, 120)
    # and one that no database change can fix
    await db.execute(
        "INSERT INTO rejected_messages (stream, raw, reason, raw_hash) "
        "VALUES ('main', '{\"ident\":\"x\",\"ident\":\"y\"}', 'duplicate key ''ident''', "
        "'\\x01'::bytea)"
    )
    refused = await db.fetchval("SELECT count(*) FROM rejected_messages WHERE reason LIKE 'Postg%'")
    assert refused == 50
    await db.execute("ALTER TABLE messages DROP CONSTRAINT speed_limit")

    conn = await asyncpg.connect(database_url, server_settings=SESSION)
    notified: list[str] = []
    await db.add_listener("flespi_messages", lambda *args: notified.append(args[-1]))
    seen: list[int] = []
    summary = await replay_rejected(
        conn, ReplaySelection(), chunk_rows=25, progress=lambda s: seen.append(s.examined)
    )
    await conn.close()

    assert (summary.moved, summary.already_present, summary.still_rejected) == (50, 0, 1)
    assert seen == [25, 50, 51]  # progress after each chunk
    assert await count(db) == 120
    payloads = sorted(
        (orjson.loads(r["payload"]) for r in await db.fetch("SELECT payload FROM messages")),
        key=lambda m: m["timestamp"],
    )
    assert payloads == batch
    left = await db.fetch("SELECT reason, replay_attempts, last_replay_at FROM rejected_messages")
    assert [(r["reason"], r["replay_attempts"]) for r in left] == [("duplicate key 'ident'", 1)]
    assert left[0]["last_replay_at"] is not None
    # the derived state follows, and listeners hear of it
    fastest = await db.fetchval(
        "SELECT (payload->>'position.speed')::int FROM device_state WHERE ident = $1",
        batch[-1]["ident"],
    )
    assert fastest == batch[-1]["position.speed"]
    await asyncio.sleep(0.1)
    assert notified


async def test_still_refused_rows_stay_with_the_new_reason_and_an_attempt_count(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str
) -> None:
    await quarantine_fast_messages(receiver, db, 10)  # speeds 50..59: none refused
    await db.execute("ALTER TABLE messages DROP CONSTRAINT speed_limit")
    await db.execute("DELETE FROM messages")
    client = await receiver()
    await db.execute("ALTER TABLE messages ADD CONSTRAINT no_ident CHECK (ident IS NULL)")
    reply = await client.post("/flespi", data=orjson.dumps([flespi_message(1)]), headers=AUTH)
    assert (await reply.json())["rejected"] == 1
    conn = await asyncpg.connect(database_url, server_settings=SESSION)
    for attempt in (1, 2):
        summary = await replay_rejected(conn, ReplaySelection(stream="main"))
        assert (summary.moved, summary.still_rejected) == (0, 1)
        row = await db.fetchrow("SELECT reason, replay_attempts FROM rejected_messages")
        assert row["replay_attempts"] == attempt
        assert "no_ident" in row["reason"]
    await conn.close()
    assert await count(db) == 0


async def test_a_message_already_stored_is_not_stored_twice(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str
) -> None:
    client = await receiver()
    message = orjson.dumps(flespi_message(7))
    await client.post("/flespi", data=b"[" + message + b"]", headers=AUTH)
    # the same message also in quarantine (refused once by a rule since removed)
    await db.execute(
        "INSERT INTO rejected_messages (stream, raw, reason, raw_hash) "
        "VALUES ('main', $1, 'PostgreSQL refused it: speed_limit', '\\x02'::bytea)",
        message,
    )
    conn = await asyncpg.connect(database_url, server_settings=SESSION)
    summary = await replay_rejected(conn, ReplaySelection())
    await conn.close()
    assert (summary.moved, summary.already_present, summary.still_rejected) == (0, 1, 0)
    assert await count(db) == 1
    assert await count(db, "rejected_messages") == 0


async def test_dry_run_says_what_would_happen_and_changes_nothing(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str
) -> None:
    await quarantine_fast_messages(receiver, db, 20)  # speeds 50..69: none refused
    await quarantine_more(receiver, db)
    conn = await asyncpg.connect(database_url, server_settings=SESSION)
    summary = await replay_rejected(conn, ReplaySelection(), dry_run=True)
    await conn.close()
    assert (summary.dry_run, summary.moved, summary.still_rejected) == (True, 3, 0)
    assert await count(db) == 20
    assert await count(db, "rejected_messages") == 3
    assert await db.fetchval("SELECT max(replay_attempts) FROM rejected_messages") == 0


async def quarantine_more(receiver: ClientFactory, db: asyncpg.Connection) -> None:
    """Three fast messages refused by the rule, then the rule dropped."""
    client = await receiver()
    fast = [flespi_message(1000 + i, **{"position.speed": 150}) for i in range(3)]
    reply = await client.post("/flespi", data=orjson.dumps(fast), headers=AUTH)
    assert (await reply.json())["rejected"] == 3
    await db.execute("ALTER TABLE messages DROP CONSTRAINT speed_limit")


async def test_selection_by_id_and_reason(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str
) -> None:
    await quarantine_fast_messages(receiver, db, 1)
    await quarantine_more(receiver, db)
    ids = [r["id"] for r in await db.fetch("SELECT id FROM rejected_messages ORDER BY id")]
    conn = await asyncpg.connect(database_url, server_settings=SESSION)
    by_id = await replay_rejected(conn, ReplaySelection(ids=ids[:1]))
    by_reason = await replay_rejected(conn, ReplaySelection(reason="no such reason"))
    by_stream = await replay_rejected(conn, ReplaySelection(stream="other"))
    rest = await replay_rejected(conn, ReplaySelection(reason="SPEED_LIMIT"))
    await conn.close()
    assert [s.moved for s in (by_id, by_reason, by_stream, rest)] == [1, 0, 0, 2]
    assert await count(db, "rejected_messages") == 0


async def test_two_replays_at_once_store_each_message_once(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str
) -> None:
    await quarantine_fast_messages(receiver, db, 600)
    await db.execute("ALTER TABLE messages DROP CONSTRAINT speed_limit")
    conns = [await asyncpg.connect(database_url, server_settings=SESSION) for _ in range(2)]
    summaries: list[ReplaySummary] = await asyncio.gather(
        *(replay_rejected(c, ReplaySelection(), chunk_rows=10) for c in conns)
    )
    for conn in conns:
        await conn.close()
    assert sum(s.moved for s in summaries) == 300
    assert all(s.moved > 0 for s in summaries)  # both did part of the work
    assert sum(s.already_present + s.still_rejected for s in summaries) == 0
    assert await count(db) == 600
    assert await count(db, "rejected_messages") == 0
    assert await db.fetchval("SELECT count(DISTINCT payload) FROM messages") == 600


async def test_the_replay_command_says_what_it_did(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    await quarantine_fast_messages(receiver, db, 1)
    await quarantine_more(receiver, db)
    config = config_file(tmp_path, database_url, 0)

    def replay(*options: str) -> dict[str, object]:
        result = subprocess.run(
            [str(SCRIPT), "rejected", "replay", "--config", str(config), *options],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        summary: dict[str, object] = orjson.loads(result.stdout.splitlines()[-1])
        return summary

    dry = replay("--reason", "speed_limit", "--dry-run")
    assert (dry["dry_run"], dry["selected"], dry["moved"]) == (True, 3, 3)
    assert await count(db, "rejected_messages") == 3
    done = replay("--stream", "main", "--since", "1h")
    assert (done["moved"], done["already_present"], done["still_rejected"]) == (3, 0, 0)
    assert await count(db, "rejected_messages") == 0
    assert await count(db) == 4


async def test_rows_of_a_stream_not_configured_are_left_and_reasons_are_summed_by_kind(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str
) -> None:
    await quarantine_fast_messages(receiver, db, 120)  # the rule stays: they still fail
    await db.execute(
        "INSERT INTO rejected_messages (stream, raw, reason, raw_hash) "
        "VALUES ('elsewhere', '{\"ident\":\"e\"}', 'PostgreSQL refused it: x', '\\x02'::bytea)"
    )
    conn = await asyncpg.connect(database_url, server_settings=SESSION)
    summary = await replay_rejected(conn, ReplaySelection(), fields={"main": DEFAULT_FIELDS})
    await conn.close()
    assert (summary.not_configured, summary.still_rejected) == (1, 50)
    assert await db.fetchval("SELECT count(*) FROM rejected_messages WHERE stream='elsewhere'") == 1
    # PostgreSQL's DETAIL quotes each row: the summary counts the first line of each reason
    ((reason, times),) = summary.as_dict()["reasons"].items()  # type: ignore[attr-defined]
    assert times == 50
    assert "speed_limit" in reason
    assert "\n" not in reason
