"""The database's state gets 503 and nothing kept; one message's refusal is quarantined alone.

Each test produces the failure for real on the receiver's own database: read-only, a role
whose privileges are revoked, a table renamed away, a lock held past command_timeout,
triggers that refuse one message (or every message), backends terminated mid-stream.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from flespi_receiver.app import create_app
from flespi_receiver.emulator import StreamEmulator, encode_messages, sample_messages
from flespi_receiver.state import POOL

from conftest import Client, ClientFactory, SettingsFactory
from helpers import AUTH, TOKEN, count, duplicated, flespi_message, wait_for_lock_wait

OK_AND_BLOCKED = orjson.dumps([{"ident": "ok"}, {"ident": "blocked"}])


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"stream": "main", **labels}:
                return sample.value
    return 0.0


async def post(client: Client, body: bytes) -> tuple[int, Any, dict[str, str]]:
    reply = await client.post("/flespi", data=body, headers=AUTH)
    return reply.status, await reply.json(), dict(reply.headers)


async def assert_unavailable(client: Client, body: bytes, kind: str) -> None:
    """503 with Retry-After, one batch line, counted by kind, and /readyz says so."""
    with capture_logs() as logs:
        status, reply, headers = await post(client, body)
    assert (status, reply["error"]) == (503, f"database unavailable ({kind}), retry later")
    assert headers["Retry-After"].isdigit()
    (line,) = [e for e in logs if e["event"] == "batch"]
    assert (line["status"], line["reason"]) == (503, reply["error"])
    (cause,) = [e for e in logs if e["event"] == "database unavailable"]
    assert cause["kind"] == kind
    text = await (await client.get("/metrics")).text()
    assert metric(text, "flespi_receiver_database_errors_total", kind=kind) == 1
    assert metric(text, "flespi_receiver_requests_total", status="503") == 1
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert "database unavailable" in (await ready.json())["error"]


async def nothing_kept(db: asyncpg.Connection) -> None:
    assert await count(db) == 0
    assert await count(db, "rejected_messages") == 0


async def test_read_only_database_gets_503_until_it_takes_writes_again(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    client = await receiver()  # its sessions are read-only, as on a standby after a failover
    await assert_unavailable(client, OK_AND_BLOCKED, "read_only")
    assert "read_only" in (await (await client.get("/readyz")).json())["error"]
    await nothing_kept(db)
    # idle sessions the pool opened meanwhile (the upkeep's, other streams') are read-only too
    pool = client.app[POOL]
    sessions = [await pool.acquire() for _ in range(3)]
    for session in sessions:
        await pool.release(session)
    await db.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
    # sessions opened while it was read-only are replaced: the next batches are stored
    statuses = [(await post(client, OK_AND_BLOCKED))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert await count(db) == 2
    assert (await client.get("/readyz")).status == 200


async def test_privileges_revoked_from_the_receiver_role(
    make_settings: SettingsFactory,
    aiohttp_client: Callable[..., Awaitable[Client]],
    db: asyncpg.Connection,
    database_url: str,
) -> None:
    role = f"receiver_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        await db.execute(
            f"GRANT USAGE ON SCHEMA flespi TO {role}; "
            f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA flespi TO {role}; "
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA flespi TO {role}; "
            f"REVOKE INSERT ON flespi.messages FROM {role}"
        )
        parts = urlsplit(database_url)
        as_role = urlunsplit(parts._replace(netloc=f"{role}:pw@{parts.hostname}:{parts.port}"))
        client = await aiohttp_client(create_app(make_settings(), as_role))
        await assert_unavailable(client, OK_AND_BLOCKED, "privileges")
        assert "privileges" in (await (await client.get("/readyz")).json())["error"]
        await nothing_kept(db)
        await db.execute(f"GRANT INSERT ON flespi.messages TO {role}")
        assert (await post(client, OK_AND_BLOCKED))[0] == 200
        await client.close()
    finally:
        await db.execute(f"DROP OWNED BY {role}")
        await db.execute(f"DROP ROLE {role}")


async def test_table_renamed_away(receiver: ClientFactory, db: asyncpg.Connection) -> None:
    client = await receiver()
    await db.execute("ALTER TABLE messages RENAME TO messages_away")
    await assert_unavailable(client, OK_AND_BLOCKED, "table_missing")
    assert "table_missing" in (await (await client.get("/readyz")).json())["error"]
    assert await count(db, "rejected_messages") == 0
    await db.execute("ALTER TABLE messages_away RENAME TO messages")
    assert (await post(client, OK_AND_BLOCKED))[0] == 200


@pytest.mark.parametrize("size", ["small", "large"])
async def test_lock_held_past_command_timeout(
    receiver: ClientFactory, db: asyncpg.Connection, size: str
) -> None:
    client = await receiver(database="command_timeout = 0.5")
    # the pool's sessions exist before the lock: they were opened by an earlier batch
    assert (await post(client, orjson.dumps([flespi_message(9000)])))[0] == 200
    body = (
        OK_AND_BLOCKED if size == "small" else orjson.dumps([flespi_message(i) for i in range(200)])
    )
    async with db.transaction():
        await db.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        pending = asyncio.create_task(post(client, body))
        await wait_for_lock_wait(db)
        status, reply, headers = await pending
        # PostgreSQL ends the statement itself: nothing goes on waiting behind the reply
        kind = "statement_timeout" if size == "small" else "lock_timeout"
        assert (status, reply["error"]) == (503, f"database unavailable ({kind}), retry later")
        assert "Retry-After" in headers
        ready = await client.get("/readyz")  # the lock is still held
        assert (ready.status, "lock_timeout" in (await ready.json())["error"]) == (503, True)
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flespi-receiver'"
            " AND wait_event_type = 'Lock'"
        )
        assert waiting == 0
    await asyncio.sleep(0.3)  # a statement left behind would commit now
    assert await count(db) == 1
    assert await count(db, "rejected_messages") == 0
    assert (await post(client, body))[0] == 200


@pytest.mark.parametrize("setting", ["lock_timeout", "statement_timeout"])
async def test_lock_or_statement_timeout_of_the_server(
    receiver: ClientFactory, db: asyncpg.Connection, setting: str
) -> None:
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE {name} SET {setting} = '200ms'")
    client = await receiver()
    async with db.transaction():
        await db.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        await assert_unavailable(client, OK_AND_BLOCKED, setting)
    await nothing_kept(db)
    assert (await post(client, OK_AND_BLOCKED))[0] == 200


# PL/pgSQL run by a BEFORE INSERT trigger for the message with ident 'blocked' only
REFUSALS = {
    "raise-exception": "RAISE EXCEPTION 'device % is blocked', NEW.ident",
    "assert": "ASSERT false, 'blocked device'",
    "division-by-zero": "PERFORM 1 / 0",
    "missing-table": "PERFORM 1 FROM no_such_table",
    "internal-error": "RAISE EXCEPTION 'blocked' USING ERRCODE = 'XX000'",
    "check-violation": "RAISE EXCEPTION 'blocked' USING ERRCODE = 'check_violation'",
}


async def refuse_in_trigger(db: asyncpg.Connection, statement: str, when: str) -> None:
    await db.execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF {when} THEN {statement}; END IF; RETURN NEW; END $$; "
        "CREATE TRIGGER refuse BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION refuse()"
    )


@pytest.mark.parametrize("size", ["small", "large"])
async def test_a_broken_after_trigger_is_the_database_state_also_in_a_resend(
    receiver: ClientFactory, db: asyncpg.Connection, size: str
) -> None:
    # the message stored before must not pass for one that still stores: ON CONFLICT skips
    # it before any AFTER trigger runs
    client = await receiver()
    old = [flespi_message(0)]
    assert (await post(client, orjson.dumps(old)))[0] == 200
    await db.execute(
        "CREATE FUNCTION broken_after() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM 1 FROM no_such_table; RETURN NULL; END $$; "
        "CREATE TRIGGER broken_after AFTER INSERT ON messages "
        "FOR EACH ROW EXECUTE FUNCTION broken_after()"
    )
    fresh = [flespi_message(i) for i in range(1, 3 if size == "small" else 200)]
    await assert_unavailable(client, orjson.dumps([*old, *fresh]), "table_missing")
    assert await count(db, "rejected_messages") == 0
    assert await count(db) == 1


@pytest.mark.parametrize("size", ["small", "large"])
async def test_a_deferred_constraint_refusing_one_message_quarantines_it(
    receiver: ClientFactory, db: asyncpg.Connection, size: str
) -> None:
    # checked only at COMMIT by default, where no message can be told apart from the others
    others = [{**flespi_message(i), "ident": "known"} for i in range(1 if size == "small" else 200)]
    await db.execute(
        "CREATE TABLE public.known_devices (ident text PRIMARY KEY);"
        "INSERT INTO public.known_devices VALUES ('known');"
        "ALTER TABLE messages ADD CONSTRAINT known_ident FOREIGN KEY (ident)"
        " REFERENCES public.known_devices (ident) DEFERRABLE INITIALLY DEFERRED"
    )
    client = await receiver()
    body = orjson.dumps([*others, {"ident": "stranger", "timestamp": 1764000000}])
    status, reply, _ = await post(client, body)
    assert (status, reply) == (200, {"stored": len(others), "duplicates": 0, "rejected": 1})
    reason = await db.fetchval("SELECT reason FROM rejected_messages")
    assert "known_ident" in reason
    assert await count(db) == len(others)


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("statement", REFUSALS.values(), ids=REFUSALS.keys())
async def test_a_trigger_refusing_one_message_quarantines_it_alone(
    receiver: ClientFactory, db: asyncpg.Connection, statement: str, size: str
) -> None:
    await refuse_in_trigger(db, statement, "NEW.ident = 'blocked'")
    client = await receiver()
    # large: over 64 KB, stored while it arrives, by COPY
    others = [flespi_message(i) for i in range(1 if size == "small" else 200)]
    body = orjson.dumps([*others[:1], {"ident": "blocked"}, *others[1:]])
    status, reply, _ = await post(client, body)
    assert (status, reply) == (200, {"stored": len(others), "duplicates": 0, "rejected": 1})
    raw, reason = await db.fetchrow("SELECT raw, reason FROM rejected_messages")
    assert (raw, reason.startswith("PostgreSQL refused it: ")) == (b'{"ident":"blocked"}', True)
    assert await count(db) == len(others)
    # sent again: nothing twice, and the stream goes on
    status, reply, _ = await post(client, body)
    assert (status, reply["duplicates"], reply["rejected"]) == (200, len(others), 1)
    assert (await post(client, orjson.dumps([flespi_message(1000)])))[0] == 200


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("statement", [REFUSALS["missing-table"], REFUSALS["internal-error"]])
async def test_a_state_class_refusal_of_the_one_new_message_of_a_resend_is_content(
    receiver: ClientFactory, db: asyncpg.Connection, statement: str, size: str
) -> None:
    # the others were stored before the trigger came; the resend brings one new message, which
    # alone fails: the others' INSERTs still pass the trigger, so the failure is that message's
    client = await receiver()
    others = [flespi_message(i) for i in range(1 if size == "small" else 200)]
    assert (await post(client, orjson.dumps(others)))[0] == 200
    await refuse_in_trigger(db, statement, "NEW.ident = 'blocked'")
    body = orjson.dumps([*others, {"ident": "blocked"}])
    status, reply, _ = await post(client, body)
    assert (status, reply) == (200, {"stored": 0, "duplicates": len(others), "rejected": 1})
    assert await db.fetchval("SELECT raw FROM rejected_messages") == b'{"ident":"blocked"}'
    assert await count(db) == len(others)
    # a trigger that fails for every message still refuses the batch as the database's state
    await db.execute("DROP TRIGGER refuse ON messages; DROP FUNCTION refuse()")
    await refuse_in_trigger(db, statement, "true")
    fresh = orjson.dumps([*others, flespi_message(5000)])
    assert (await post(client, fresh))[0] == 503


@pytest.mark.parametrize(
    ("statement", "outcome"),
    [
        (REFUSALS["raise-exception"], 200),  # the trigger's own refusal: content
        (REFUSALS["check-violation"], 200),
        (REFUSALS["missing-table"], 503),  # a broken trigger: the database's state
        (REFUSALS["internal-error"], 503),
        # a trigger that means "not now" says so with a SQLSTATE of the database's state
        ("RAISE EXCEPTION 'not now' USING ERRCODE = 'lock_not_available'", 503),
    ],
    ids=["raise-exception", "check-violation", "missing-table", "internal-error", "not-now"],
)
async def test_a_one_message_batch_is_decided_by_the_class_of_its_error(
    receiver: ClientFactory, db: asyncpg.Connection, statement: str, outcome: int
) -> None:
    await refuse_in_trigger(db, statement, "NEW.ident = 'blocked'")
    client = await receiver()
    status, reply, _ = await post(client, b'[{"ident":"blocked"}]')
    assert status == outcome
    assert ("error" in reply) == (outcome == 503)
    assert await count(db, "rejected_messages") == (1 if outcome == 200 else 0)


@pytest.mark.parametrize("size", ["small", "large"])
async def test_a_trigger_failing_for_every_message_never_quarantines_the_stream(
    receiver: ClientFactory, db: asyncpg.Connection, size: str
) -> None:
    await refuse_in_trigger(db, REFUSALS["missing-table"], "true")
    client = await receiver()
    body = orjson.dumps([flespi_message(i) for i in range(2 if size == "small" else 200)])
    await assert_unavailable(client, body, "table_missing")
    await nothing_kept(db)
    await db.execute("DROP TRIGGER refuse ON messages")
    assert (await post(client, body))[0] == 200


async def test_backends_terminated_again_and_again_during_a_stream(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(database="pool_size = 2")
    messages = encode_messages(sample_messages(800, seed=11))
    emulator = StreamEmulator(
        str(client.make_url("/flespi")), authorization=TOKEN, retry_delay=0.01
    )
    stream = asyncio.create_task(emulator.run(messages, batch_size=100))
    with capture_logs() as logs:
        while not stream.done():
            await db.execute(
                # only this test's own database: the server may be shared
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'flespi-receiver' AND datname = current_database()"
            )
            await asyncio.sleep(0.05)
        stats = await stream
    # named for what happened to the session, with the server's own error
    causes = [e for e in logs if e["event"] == "database unavailable"]
    assert causes
    kinds = {e["kind"] for e in causes}
    assert kinds <= {"connection", "shutdown", "connection_state"}, [e["error"] for e in causes]
    assert not [e for e in causes if "terminate()" in e["error"]], causes
    assert set(stats.statuses) <= {200, 503}, stats.statuses
    assert stats.statuses.get(503, 0) > 0, "no batch met a terminated backend"
    assert await count(db) == 800
    assert await duplicated(db) == 0
