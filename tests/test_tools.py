"""The load tools users run themselves: `emulate` against a receiver, `bench` end to end."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import orjson

from conftest import ClientFactory, Server
from helpers import SCRIPT, TOKEN, count


async def test_emulate_delivers_every_message_once(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    command = [
        str(SCRIPT),
        "emulate",
        str(client.make_url("/flespi")),
        "--count",
        "250",
        "--batch-size",
        "40",
        "--authorization",
        TOKEN,
        "--resend-rate",
        "0.5",
        "--gzip",
    ]
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
    stdout, _ = await process.communicate()
    assert process.returncode == 0
    summary = orjson.loads(stdout)
    assert summary["messages"] == 250
    assert summary["statuses"] == {"200": summary["posts"]}
    assert summary["resent_acknowledged"] > 0
    assert await count(db) == 250


def test_bench_prints_the_comparison(pg_server: Server) -> None:
    result = subprocess.run(
        [
            str(SCRIPT),
            "bench",
            "--database-url",
            pg_server.url,
            "--count",
            "300",
            "--batch-size",
            "100",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = orjson.loads(result.stdout.splitlines()[-1])
    (run,) = summary["batches"]
    assert run["flespi-receiver"]["messages"] == 1000
    assert run["receiver_vs_copy"] > 0
    assert run["receiver_vs_naive"] > 0
    assert "receiver/COPY" in result.stdout
