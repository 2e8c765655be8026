"""The load tools users run themselves: `emulate` against a receiver, `bench` end to end."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import asyncpg
import orjson

from conftest import Client, ClientFactory, Server
from helpers import SCRIPT, TOKEN, count


async def emulate(client: Client, *options: str) -> tuple[int | None, bytes, bytes]:
    """`flespi-receiver emulate` against the test receiver, as a user runs it."""
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT),
        "emulate",
        str(client.make_url("/flespi")),
        *options,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    return process.returncode, stdout, stderr


async def test_emulate_delivers_every_message_once(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    returncode, stdout, _ = await emulate(
        client,
        "--count",
        "250",
        "--batch-size",
        "40",
        "--authorization",
        TOKEN,
        "--resend-rate",
        "0.5",
        "--gzip",
    )
    assert returncode == 0
    summary = orjson.loads(stdout)
    assert summary["messages"] == 250
    assert summary["statuses"] == {"200": summary["posts"]}
    assert summary["resent_acknowledged"] > 0
    assert await count(db) == 250


def bench(server: Server, *options: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """`flespi-receiver bench` on the test server; the process and its closing JSON line."""
    result = subprocess.run(
        [str(SCRIPT), "bench", "--database-url", server.url, *options],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result, orjson.loads(result.stdout.splitlines()[-1])


def test_bench_prints_the_comparison(pg_server: Server) -> None:
    result, summary = bench(pg_server, "--count", "300", "--batch-size", "100", "--rounds", "1")
    (run,) = summary["batches"]
    assert run["flespi-receiver"]["messages"] == 1000
    assert run["receiver_vs_copy"] > 0
    assert run["receiver_vs_naive"] > 0
    assert "receiver/COPY" in result.stdout


def test_growth_and_memory_benchmarks_run(pg_server: Server) -> None:
    _, growth = bench(pg_server, "--growth", "2000", "--growth-step", "1000", "--count", "300")
    # each point is measured three times with 300 new messages
    assert [point["rows"] for point in growth["growth"]] == [0, 1900, 3800]
    _, memory = bench(pg_server, "--memory", "3000", "--max-body-size", "4194304")
    assert memory["messages_streamed"] == 3000
    assert 3.9 < memory["big_body_mb"] <= 4.0


async def test_emulate_can_give_up_on_a_refused_batch(receiver: ClientFactory) -> None:
    client = await receiver()
    returncode, _, stderr = await emulate(
        client, "--count", "10", "--authorization", "Bearer wrong", "--max-attempts", "3"
    )
    assert returncode == 1
    assert b"not acknowledged after 3 attempts" in stderr
    assert b"Traceback" not in stderr
