"""`status` and `rejected list|show|export` through the real command line and database."""

from __future__ import annotations

import asyncio
import base64
import subprocess
from pathlib import Path

import asyncpg
import orjson
import pytest

from flespi_receiver.embedded import free_port
from flespi_receiver.migrate import migrations
from flespi_receiver.quarantine import RejectedFilter, list_rejected, parse_since, readable

from conftest import ClientFactory
from helpers import AUTH, SCRIPT, config_file, flespi_message

INVALID_UTF8 = b'{"ident": "x", "name": "\xff\xfe"}'
NUL_ESCAPE = b'{"ident": "y", "note": "a\\u0000b"}'
NOT_JSON = b"\x00\x01 this is not json \xff"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(SCRIPT), *args, "--config", str(config)],
        capture_output=True,
        check=False,
        timeout=60,
    )


@pytest.fixture
async def quarantine(
    receiver: ClientFactory, database_url: str, tmp_path: Path
) -> tuple[Path, asyncpg.Connection]:
    """A database holding two messages and three rejected rows (invalid UTF-8, NUL, not JSON)."""
    client = await receiver()
    good = [orjson.dumps(flespi_message(i)) for i in range(2)]
    body = b"[" + b",".join([good[0], INVALID_UTF8, NUL_ESCAPE, good[1]]) + b"]"
    reply = await client.post("/flespi", data=body, headers=AUTH)
    assert await reply.json() == {"stored": 2, "duplicates": 0, "rejected": 2}
    reply = await client.post("/flespi", data=NOT_JSON, headers=AUTH)
    assert (await reply.json())["rejected"] == 1
    return config_file(tmp_path, database_url, free_port()), client


def run(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    result = cli(config, *args)
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    return result


async def test_rejected_list_filters_newest_first(
    quarantine: tuple[Path, object], db: asyncpg.Connection
) -> None:
    config, _ = quarantine
    ids = [r["id"] for r in await db.fetch("SELECT id FROM rejected_messages ORDER BY id")]
    listed = orjson.loads(
        (await asyncio.to_thread(run, config, "rejected", "list", "--json")).stdout
    )
    assert [r["id"] for r in listed] == ids[::-1]
    whole = orjson.loads(
        (
            await asyncio.to_thread(
                run, config, "rejected", "list", "--json", "--reason", "NOT A JSON ARRAY"
            )
        ).stdout
    )
    assert [r["id"] for r in whole] == [ids[-1]]
    assert whole[0]["preview"].startswith("\\x00\\x01 this is not json \\xff")
    # the other filters, on the module the command is a layer over
    for where, limit, expected in (
        (RejectedFilter(stream="main", since=parse_since("1h")), 50, 3),
        (RejectedFilter(stream="other"), 50, 0),
        (RejectedFilter(since=parse_since("2999-01-01")), 50, 0),
        (RejectedFilter(), 1, 1),
    ):
        assert len(await list_rejected(db, where, limit)) == expected, where
    table = (await asyncio.to_thread(run, config, "rejected", "list")).stdout.decode()
    assert table.splitlines()[0].split()[:2] == ["id", "received"]
    assert len(table.splitlines()) == 4


async def test_rejected_show_is_readable_whatever_the_bytes(
    quarantine: tuple[Path, object], db: asyncpg.Connection
) -> None:
    config, _ = quarantine
    rows = {
        bytes(r["raw"]): r["id"] for r in await db.fetch("SELECT id, raw FROM rejected_messages")
    }
    shown = (
        await asyncio.to_thread(run, config, "rejected", "show", str(rows[INVALID_UTF8]))
    ).stdout
    assert b'"name": "\\xff\\xfe"}' in shown
    assert b"not shown exactly" in shown
    shown = (await asyncio.to_thread(run, config, "rejected", "show", str(rows[NOT_JSON]))).stdout
    assert b"\\x00\\x01 this is not json \\xff" in shown
    assert b"\x00" not in shown
    # valid UTF-8 (a JSON escape is not a NUL byte) is shown as it is
    assert readable(NUL_ESCAPE) == (NUL_ESCAPE.decode(), True)
    exact = await asyncio.to_thread(run, config, "rejected", "show", str(rows[NOT_JSON]), "--raw")
    assert exact.stdout == NOT_JSON
    missing = await asyncio.to_thread(cli, config, "rejected", "show", "999999")
    assert missing.returncode == 1
    assert b"no rejected row with id 999999" in missing.stderr


async def test_rejected_export_is_exact(
    quarantine: tuple[Path, object], db: asyncpg.Connection, tmp_path: Path
) -> None:
    config, _ = quarantine
    out = await asyncio.to_thread(run, config, "rejected", "export")
    records = [orjson.loads(line) for line in out.stdout.splitlines()]
    stored = {
        r["id"]: bytes(r["raw"]) for r in await db.fetch("SELECT id, raw FROM rejected_messages")
    }
    assert {r["id"]: base64.b64decode(r["raw_base64"]) for r in records} == stored
    texts = {base64.b64decode(r["raw_base64"]): r["text"] for r in records}
    assert texts == {INVALID_UTF8: None, NOT_JSON: None, NUL_ESCAPE: NUL_ESCAPE.decode()}
    target = tmp_path / "rejected.jsonl"
    await asyncio.to_thread(
        run, config, "rejected", "export", "--output", str(target), "--reason", "utf"
    )
    assert len(target.read_text().splitlines()) == 1


async def test_status_reports_streams_and_database(
    quarantine: tuple[Path, object],
) -> None:
    config, _ = quarantine
    report = orjson.loads((await asyncio.to_thread(run, config, "status", "--json")).stdout)
    (main,) = report["streams"]
    assert main["name"] == "main"
    assert (main["stored"], main["last_hour"], main["rejected"], main["devices"]) == (2, 2, 3, 2)
    assert main["last_commit"] is not None
    database = report["database"]
    assert database["schema_version"] == migrations()[-1].version
    assert database["pending_migrations"] == []
    assert database["trigger"] is True
    assert database["size_bytes"] > 0
    assert "********" in database["url"]
    text = (await asyncio.to_thread(run, config, "status")).stdout.decode()
    assert "(current)" in text
    assert text.splitlines()[-1].split()[:4] == ["main", "2", "2", main["last_commit"][:10]]


def test_rejected_since_says_what_it_expects(tmp_path: Path, database_url: str) -> None:
    result = cli(
        config_file(tmp_path, database_url, free_port()), "rejected", "list", "--since", "yesterday"
    )
    assert result.returncode == 2
    assert b"neither a time" in result.stderr
