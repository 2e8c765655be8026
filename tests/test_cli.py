"""The console script for real: migrate, serve, and a graceful stop that finishes a batch."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from flespi_receiver.embedded import free_port

from helpers import (
    AUTH,
    SCRIPT,
    config_file,
    count,
    flespi_message,
    log_events,
    receiver_process,
    wait_until_serving,
)


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def serving(tmp_path: Path, database_url: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`flespi-receiver serve` started the way a user starts it."""
    with receiver_process(config_file(tmp_path, database_url, port)) as process:
        yield process


def test_migrate_command_is_idempotent(tmp_path: Path, database_url: str) -> None:
    config = config_file(tmp_path, database_url, free_port())
    for _ in range(2):
        result = subprocess.run(
            [str(SCRIPT), "migrate", "--config", str(config)], capture_output=True, check=False
        )
        assert result.returncode == 0, result.stderr


async def test_serve_stores_batches_and_stops_on_sigterm(
    serving: subprocess.Popen[bytes], port: int, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await wait_until_serving(port, serving)
    async with aiohttp.ClientSession() as session:
        body = orjson.dumps([flespi_message(i) for i in range(10)])
        async with session.post(f"http://127.0.0.1:{port}/flespi", data=body, headers=AUTH) as r:
            assert r.status == 200
            assert await r.json() == {"stored": 10, "duplicates": 0, "rejected": 0}
    serving.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(serving.wait, 20) == 0
    assert await count(db) == 10
    events = log_events(tmp_path / "receiver.toml")
    batch = next(e for e in events if e["event"] == "batch")
    assert (batch["stream"], batch["messages"], batch["stored"]) == ("main", 10, 10)
    assert "duration_ms" in batch
    assert events[-1]["event"] == "stopped"


async def test_sigterm_finishes_the_batch_in_flight(
    serving: subprocess.Popen[bytes], port: int, db: asyncpg.Connection
) -> None:
    await wait_until_serving(port, serving)
    body = orjson.dumps([flespi_message(i) for i in range(5)])
    # hold the table so the batch is stuck inside its transaction when SIGTERM arrives
    locker = db
    transaction = locker.transaction()
    await transaction.start()
    await locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(
            session.post(f"http://127.0.0.1:{port}/flespi", data=body, headers=AUTH)
        )
        await asyncio.sleep(0.5)
        serving.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert serving.poll() is None, "receiver must wait for the batch in flight"
        # meanwhile nothing new is taken: refused at the door, or 503 to be sent again
        async with aiohttp.ClientSession() as late:
            try:
                async with late.post(
                    f"http://127.0.0.1:{port}/flespi", data=body, headers=AUTH
                ) as refused:
                    assert refused.status == 503
            except aiohttp.ClientConnectionError:
                pass
        await transaction.rollback()  # release the lock: the batch can now commit
        reply = await request
        assert reply.status == 200
        assert (await reply.json())["stored"] == 5
    assert await asyncio.to_thread(serving.wait, 20) == 0
    assert await count(db) == 5
