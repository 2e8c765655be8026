"""SIGHUP applies a configuration all or nothing: a file that can't be applied as a whole
changes nothing, a removed stream stops accepting, a world-writable file is refused."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from flespi_receiver.embedded import free_port

from helpers import (
    AUTH,
    config_file,
    flespi_message,
    log_events,
    receiver_process,
    wait_until_serving,
)

BODY = orjson.dumps([flespi_message(1)])
NEW = {"Authorization": "Bearer new-token"}
SECOND = '\n[[streams]]\nname = "second"\npath = "/second"\nauthorization = ["Bearer second-1"]\n'


async def post(port: int, path: str, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}{path}", data=BODY, headers=headers) as reply,
    ):
        return reply.status


async def test_a_reload_is_all_or_nothing(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    original = config.read_text()
    rotated = original.replace('["Bearer test-token"]', '["Bearer new-token"]')
    with receiver_process(config) as process:
        await wait_until_serving(port, process)

        async def reload(text: str, mode: int = 0o600) -> None:
            config.write_text(text)
            config.chmod(mode)
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.4)

        # a new token together with a setting that needs a restart: nothing changes
        await reload(rotated.replace("shutdown_timeout = 20", "shutdown_timeout = 21"))
        assert await post(port, "/flespi", AUTH) == 200
        assert await post(port, "/flespi", NEW) == 401
        # a file cut in the middle of a value: nothing changes
        await reload(rotated[: rotated.index("new-token") + 3])
        assert await post(port, "/flespi", AUTH) == 200
        # a file anyone may write: refused, whatever it holds
        await reload(rotated, 0o666)
        assert await post(port, "/flespi", NEW) == 401
        # TLS turned on for a server that listens in plain HTTP: only a restart can
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        cert.write_text("not read: refused before")
        key.write_text("not read: refused before")
        tls = f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        await reload(rotated.replace("[server]\n", tls, 1))
        assert await post(port, "/flespi", NEW) == 401
        # the same file, private: applied
        await reload(rotated)
        assert await post(port, "/flespi", NEW) == 200
        assert await post(port, "/flespi", AUTH) == 401
        process.terminate()
        assert process.wait(20) == 0
    refusals = [e["error"] for e in log_events(config) if e["event"].startswith("reload refused")]
    assert len(refusals) == 4
    assert "server.shutdown_timeout" in refusals[0]
    assert "not valid TOML" in refusals[1]
    assert "chmod o-w" in refusals[2]
    assert "TLS is turned on or off only by a restart" in refusals[3]


async def test_a_removed_stream_stops_accepting_at_reload(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    original = config.read_text()
    config.write_text(original + SECOND)
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        second = {"Authorization": "Bearer second-1"}
        assert await post(port, "/second", second) == 200
        config.write_text(original)
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.4)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://127.0.0.1:{port}/second", data=BODY, headers=second) as gone,
        ):
            assert gone.status == 404
            assert gone.headers["X-Request-Id"]
            assert gone.headers["Connection"] == "close"
        assert await post(port, "/flespi", AUTH) == 200
        process.send_signal(signal.SIGHUP)  # a reload that removes nothing more
        await asyncio.sleep(0.4)
        process.terminate()
        assert process.wait(20) == 0
    reloaded = [e for e in log_events(config) if e["event"] == "configuration reloaded"]
    assert [e["removed_streams"] for e in reloaded] == [["second"], []]
