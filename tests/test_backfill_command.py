"""`flespi-receiver backfill` as an operator runs it: killed mid-page, run again, wrong token."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest
from flespi_rest import TOKEN, FlespiRest, flespi_rest
from test_backfill import DEVICES, by_number, deliver

from conftest import ClientFactory
from helpers import AUTH, SCRIPT, count, flespi_message

FROM, TO = "2025-01-01T00:00:00Z", "1767225600"  # ISO 8601 and Unix seconds both work


@pytest.fixture
async def rest() -> AsyncIterator[FlespiRest]:
    async with flespi_rest(FlespiRest()) as state:
        yield state


def config(tmp_path: Path, database_url: str, identity: str = "content") -> Path:
    path = tmp_path / "backfill.toml"
    path.write_text(
        f'[log]\nformat = "json"\n[database]\nurl = "{database_url}"\n'
        '[[streams]]\nname = "main"\npath = "/flespi"\nauthorization = ["Bearer test-token"]\n'
        f'identity = "{identity}"\n'
    )
    return path


async def start_backfill(
    tmp_path: Path, database_url: str, rest: FlespiRest, token: str = TOKEN, *extra: str
) -> asyncio.subprocess.Process:
    token_file = tmp_path / "token"
    token_file.write_text(f"FlespiToken {token}\n")
    return await asyncio.create_subprocess_exec(
        str(SCRIPT),
        "backfill",
        "--config",
        str(config(tmp_path, database_url)),
        "--stream",
        "main",
        "--devices",
        "all",
        "--from",
        FROM,
        "--to",
        TO,
        "--token-file",
        str(token_file),
        "--api-url",
        rest.url,
        "--page-size",
        "10",
        *extra,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "FLESPI_TOKEN"},
    )


async def test_killed_mid_page_it_resumes_and_stores_each_message_once(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
    rest: FlespiRest,
    tmp_path: Path,
) -> None:
    await deliver(receiver, by_number(0, 45))
    for message in by_number(30, 120):
        rest.add(message["device.id"], message)
    # the third page never arrives (after the token's check): killed while waiting for it
    rest.faults = [None, None, None, "hang"]
    process = await start_backfill(tmp_path, database_url, rest)
    await asyncio.wait_for(rest.hanging.wait(), 30)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    progress = await db.fetchrow("SELECT * FROM backfill_progress WHERE device_id = $1", DEVICES[0])
    assert progress["pages"] == 2
    assert not progress["done"]
    asked_before = len(rest.requests)

    process = await start_backfill(tmp_path, database_url, rest)
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    summary = orjson.loads(stdout.splitlines()[-1])
    resumed = rest.requests[asked_before + 1]  # after the token's check
    assert resumed["device"] == DEVICES[0]
    assert resumed["from"] == progress["next_from"]  # not the start of the range again
    assert await count(db) == 120
    assert await db.fetchval("SELECT count(DISTINCT payload) FROM messages") == 120
    assert summary["devices"] == 3

    # a rerun of the finished range stores nothing and asks for no page (the token's check
    # of one message aside)
    asked = len(rest.requests)
    process = await start_backfill(tmp_path, database_url, rest)
    stdout, _ = await process.communicate()
    assert orjson.loads(stdout.splitlines()[-1])["stored"] == 0
    assert len(rest.requests) == asked + 1


async def test_a_wrong_token_exits_2_saying_so_and_never_shows_the_token(
    database_url: str, rest: FlespiRest, tmp_path: Path
) -> None:
    rest.add(DEVICES[0], by_number(0, 1)[0])
    process = await start_backfill(tmp_path, database_url, rest, "wrong-secret-token")
    stdout, stderr = await process.communicate()
    assert process.returncode == 2
    assert "flespi refused the token (HTTP 401: Unauthorized)" in stderr.decode()
    assert b"wrong-secret-token" not in stdout + stderr
    assert rest.authorizations == ["FlespiToken wrong-secret-token"]


@pytest.mark.parametrize("identity", ["content", "text"])
async def test_without_a_token_or_a_content_identity_it_says_what_to_do(
    database_url: str, rest: FlespiRest, tmp_path: Path, identity: str
) -> None:
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT),
        "backfill",
        "--config",
        str(config(tmp_path, database_url, identity)),
        "--stream",
        "main",
        "--devices",
        "all",
        "--from",
        FROM,
        "--to",
        TO,
        "--api-url",
        rest.url,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "FLESPI_TOKEN"},
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    if identity == "text":
        assert "stream 'main' keys its messages by their text" in stderr.decode()
        assert 'set identity = "content"' in stderr.decode()
    else:
        assert "--token-file" in stderr.decode()
        assert "$FLESPI_TOKEN" in stderr.decode()
    assert rest.authorizations == []


async def test_dry_run_counts_and_stores_nothing(
    db: asyncpg.Connection, database_url: str, rest: FlespiRest, tmp_path: Path
) -> None:
    for message in by_number(0, 30):
        rest.add(message["device.id"], message)
    process = await start_backfill(tmp_path, database_url, rest, TOKEN, "--dry-run")
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    summary = orjson.loads(stdout.splitlines()[-1])
    assert (summary["dry_run"], summary["stored"]) == (True, 30)
    assert await count(db) == 0
    assert await count(db, "backfill_progress") == 0


async def test_a_dry_run_changes_nothing_not_even_a_stream_waiting_to_be_rekeyed(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
    rest: FlespiRest,
    tmp_path: Path,
) -> None:
    client = await receiver()  # the stream keyed by text, as it was before the switch
    reply = await client.post("/flespi", data=orjson.dumps([flespi_message(1)]), headers=AUTH)
    assert reply.status == 200
    before = await db.fetch("SELECT id, message_hash FROM messages")
    rest.add(DEVICES[0], by_number(0, 1)[0])
    process = await start_backfill(tmp_path, database_url, rest, TOKEN, "--dry-run")
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert "`flespi-receiver migrate` re-keys them" in stderr.decode()
    assert await db.fetch("SELECT id, message_hash FROM messages") == before
    assert await db.fetchval("SELECT count(*) FROM stream_identity WHERE identity = 'content'") == 0
    # a wrong token is found out before anything is migrated or re-keyed, dry run or not
    process = await start_backfill(tmp_path, database_url, rest, "wrong-secret-token")
    await process.communicate()
    assert process.returncode == 2
    assert await db.fetch("SELECT id, message_hash FROM messages") == before


async def test_an_error_page_quoting_the_token_shows_it_masked(
    database_url: str, rest: FlespiRest, tmp_path: Path
) -> None:
    rest.add(DEVICES[0], by_number(0, 1)[0])
    rest.faults = ["echo"]
    process = await start_backfill(tmp_path, database_url, rest)
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert "internal error for FlespiToken ********" in stderr.decode()
    assert TOKEN.encode() not in stdout + stderr
    assert orjson.loads(stdout.splitlines()[-1])["stored"] == 1


async def test_a_200_with_errors_is_tried_again_not_taken_for_no_messages(
    db: asyncpg.Connection, database_url: str, rest: FlespiRest, tmp_path: Path
) -> None:
    for message in by_number(0, 2):
        rest.add(DEVICES[0], message)
    rest.faults = [None, "errors"]  # the token check's page, then the first real page
    process = await start_backfill(tmp_path, database_url, rest)
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert "HTTP 200 with errors" in stderr.decode()
    assert orjson.loads(stdout.splitlines()[-1])["stored"] == 2
    assert await count(db) == 2


async def test_a_token_that_may_not_read_messages_changes_nothing(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    database_url: str,
    rest: FlespiRest,
    tmp_path: Path,
) -> None:
    client = await receiver()  # rows keyed by text, waiting to be re-keyed by content
    reply = await client.post("/flespi", data=orjson.dumps([flespi_message(1)]), headers=AUTH)
    assert reply.status == 200
    before = await db.fetch("SELECT id, message_hash FROM messages")
    rest.add(DEVICES[0], by_number(0, 1)[0])
    rest.faults = [403]
    process = await start_backfill(tmp_path, database_url, rest)
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert "flespi refused the token" in stderr.decode()
    assert await db.fetch("SELECT id, message_hash FROM messages") == before
    assert await count(db, "backfill_progress") == 0


async def test_a_stream_reading_renamed_parameters_is_not_backfilled(
    database_url: str, rest: FlespiRest, tmp_path: Path
) -> None:
    path = config(tmp_path, database_url)
    path.write_text(path.read_text() + '[streams.fields]\nnotation = "pascal"\n')
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT),
        "backfill",
        "--config",
        str(path),
        "--stream",
        "main",
        "--devices",
        "all",
        "--from",
        FROM,
        "--to",
        TO,
        "--token-file",
        str(token_file),
        "--api-url",
        rest.url,
        stderr=subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert "reads renamed parameters" in stderr.decode()
    assert rest.authorizations == []
