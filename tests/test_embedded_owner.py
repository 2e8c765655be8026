"""One owner per embedded data folder: other commands use its server, never stop it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from flespi_receiver.embedded import EmbeddedPostgres, free_port

from helpers import AUTH, SCRIPT, flespi_message, log_of, receiver_process


@dataclass
class Embedded:
    """A receiver configured with the embedded server in a folder of its own."""

    config: Path
    data_dir: Path
    port: int


def embedded_config(tmp_path: Path) -> Embedded:
    port = free_port()
    data_dir = tmp_path / "pg"
    config = tmp_path / "embedded.toml"
    config.write_text(
        f'[server]\nport = {port}\nshutdown_timeout = 5\n[log]\nformat = "json"\n'
        f'[database]\nurl = ""\ndata_dir = "{data_dir}"\nacquire_timeout = 2\n'
        '[[streams]]\nname = "main"\npath = "/flespi"\nauthorization = ["Bearer test-token"]\n'
    )
    return Embedded(config, data_dir, port)


def cli(embedded: Embedded, *args: str) -> subprocess.CompletedProcess[str]:
    """A `flespi-receiver` command on the same configuration, as a user runs it."""
    return subprocess.run(
        [str(SCRIPT), *args, "--config", str(embedded.config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


async def post(port: int, *messages: dict[str, object]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{port}/flespi", data=orjson.dumps(list(messages)), headers=AUTH
        ) as reply,
    ):
        return reply.status, await reply.read()


async def wait_ready(embedded: Embedded, process: subprocess.Popen[bytes]) -> None:
    """Ready within a minute: the first start runs initdb."""
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            assert process.poll() is None, "receiver exited during start"
            try:
                url = f"http://127.0.0.1:{embedded.port}/readyz"
                async with session.get(url) as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("receiver did not become ready")


@pytest.fixture
def embedded(tmp_path: Path) -> Embedded:
    return embedded_config(tmp_path)


@pytest.fixture
def owner(embedded: Embedded) -> Iterator[subprocess.Popen[bytes]]:
    """`flespi-receiver serve` owning the embedded server."""
    with receiver_process(embedded.config) as process:
        yield process
        if process.poll() is None:  # stopped as a user stops it: it stops its server too
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    server = EmbeddedPostgres(embedded.data_dir)
    if server.postmaster() is not None:  # the owner was killed: clean up as the next one would
        server.start()
        server.stop()


async def test_commands_beside_a_serving_receiver_use_its_server(
    embedded: Embedded, owner: subprocess.Popen[bytes]
) -> None:
    await wait_ready(embedded, owner)
    assert (await post(embedded.port, flespi_message(1)))[0] == 200

    migrated = await asyncio.to_thread(cli, embedded, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    status = await asyncio.to_thread(cli, embedded, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = orjson.loads(status.stdout)
    assert (report["database"]["embedded"], report["streams"][0]["stored"]) == (True, 1)
    url = await asyncio.to_thread(cli, embedded, "db-url")
    assert url.returncode == 0, url.stderr
    conn = await asyncpg.connect(url.stdout.strip())
    try:
        assert await conn.fetchval("SELECT count(*) FROM flespi.messages") == 1
    finally:
        await conn.close()
    psql = await asyncio.to_thread(
        cli, embedded, "psql", "-At", "-c", "SELECT count(*) FROM messages"
    )
    assert (psql.returncode, psql.stdout.strip()) == (0, "1"), psql.stderr

    second = await asyncio.to_thread(cli, embedded, "serve")
    assert second.returncode == 2
    assert f"already running, PID {owner.pid}" in second.stderr
    assert "Traceback" not in second.stderr

    # the first receiver and its database are still serving
    status, body = await post(embedded.port, flespi_message(2))
    assert (status, orjson.loads(body)["stored"]) == (200, 1)
    assert owner.poll() is None


async def test_a_killed_owners_server_is_cleaned_up_by_the_next(
    embedded: Embedded, owner: subprocess.Popen[bytes]
) -> None:
    await wait_ready(embedded, owner)
    owner.kill()
    owner.wait()
    server = EmbeddedPostgres(embedded.data_dir)
    assert server.postmaster() is not None, "the server outlives its killed owner"
    result = await asyncio.to_thread(cli, embedded, "migrate")
    assert result.returncode == 0, result.stderr
    assert server.postmaster() is None, "the next owner stopped the stale server, then its own"
    # with no server running, psql starts one for its session
    result = await asyncio.to_thread(
        cli, embedded, "psql", "-At", "-c", "SELECT 1", "-c", "SHOW search_path"
    )
    assert (result.returncode, result.stdout.split()) == (0, ["1", "flespi,public"])
    assert server.postmaster() is None


async def test_a_receiver_starts_its_stopped_server_again(
    embedded: Embedded, owner: subprocess.Popen[bytes]
) -> None:
    await wait_ready(embedded, owner)
    info = EmbeddedPostgres(embedded.data_dir).postmaster()
    assert info is not None
    os.kill(info.pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown, as after a crash
    statuses = []
    for _ in range(150):
        status, _ = await post(embedded.port, flespi_message(len(statuses)))
        statuses.append(status)
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert statuses[-1] == 200, f"still {statuses[-5:]} after 15 s"
    # the restart is logged once the start command returns, which may be just after the
    # server already answers the pool
    events: list[str] = []
    for _ in range(100):
        log = log_of(embedded.config).read_text().splitlines()
        events = [orjson.loads(line)["event"] for line in log if line.startswith("{")]
        if "embedded PostgreSQL started again" in events:
            break
        await asyncio.sleep(0.1)
    assert "embedded PostgreSQL started again" in events


def test_db_url_says_when_the_embedded_server_is_not_running(embedded: Embedded) -> None:
    result = cli(embedded, "db-url")
    assert result.returncode == 1
    assert "is not running: start the receiver" in result.stderr
    assert result.stdout == ""
