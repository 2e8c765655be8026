"""Small helpers shared by the tests: messages that look like flespi's, and table reads."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from flespi_receiver.embedded import free_port

TOKEN = "Bearer test-token"
# a whole valid configuration file, with secrets that must never be printed
VALID_CONFIG = """
[database]
url = "postgresql://flespi:db-secret@db.example:5432/flespi"

[[streams]]
name = "main"
path = "/flespi"
authorization = ["Bearer very-secret-token"]
"""
AUTH = {"Authorization": TOKEN}


def streams_toml(*streams: tuple[str, str, str]) -> str:
    """[[streams]] tables for (name, path, authorization value) triples."""
    return "".join(
        f'\n[[streams]]\nname = "{name}"\npath = "{path}"\nauthorization = ["{token}"]\n'
        for name, path, token in streams
    )


def flespi_message(i: int, **extra: Any) -> dict[str, Any]:
    """A message shaped like those flespi sends: flat, dotted names, a few nested values."""
    message: dict[str, Any] = {
        "ident": f"3526253332{i:05d}",
        "timestamp": 1764000000 + i + 0.25,
        "server.timestamp": 1764000001.5 + i,
        "channel.id": 1234,
        "device.id": 500000 + i,
        "device.name": f"Грузовик {i}",
        "position.latitude": 49.069782,
        "position.longitude": 28.632826,
        "position.speed": i % 120,
        "engine.ignition.status": i % 2 == 0,
        "ain.2": None,
        "can.error.codes": ["P0101", "P0420"],
        "ble.beacons": [{"ble.beacon.id": "a1b2", "ble.rssi": -70}],
    }
    message.update(extra)
    return message


async def count(db: asyncpg.Connection, table: str = "messages") -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {table}"))


SCRIPT = Path(sys.executable).parent / "flespi-receiver"


def config_file(tmp_path: Path, database_url: str, port: int, name: str = "receiver") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[server]\nport = {port}\nshutdown_timeout = 20\n[log]\nformat = "json"\n'
        f'[database]\nurl = "{database_url}"\nacquire_timeout = 2\ncommand_timeout = 10\n'
        '[[streams]]\nname = "main"\npath = "/flespi"\nauthorization = ["Bearer test-token"]\n'
    )
    return path


def log_of(config: Path) -> Path:
    """Where `receiver_process` writes the log of the receiver started with `config`."""
    return config.with_suffix(".log")


def log_events(config: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log_of(config).read_text().splitlines()]


@contextmanager
def receiver_process(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`flespi-receiver serve` as its own process, killed at the end if still running."""
    with log_of(config).open("ab") as log:  # a file, not a pipe: a full pipe would block it
        process = subprocess.Popen(
            [str(SCRIPT), "serve"],
            env={**os.environ, "FLESPI_RECEIVER_CONFIG": str(config)},
            stderr=log,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


async def wait_until_serving(port: int, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            assert process.poll() is None, "receiver exited during start"
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("receiver did not become ready")


async def wait_for_lock_wait(db: asyncpg.Connection) -> int:
    """The pid of the receiver backend that waits on a lock the test holds."""
    for _ in range(200):
        pid = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'flespi-receiver' "
            "AND wait_event_type = 'Lock'"
        )
        if pid:
            return int(pid)
        await asyncio.sleep(0.02)
    raise AssertionError("no receiver backend is waiting on the lock")


async def duplicated(db: asyncpg.Connection) -> int:
    """Rows whose payload appears more than once in the stream."""
    return int(
        await db.fetchval("SELECT count(*) - count(DISTINCT (stream, payload)) FROM messages")
    )


REJECT_STREAM = """
[[streams]]
name = "strict"
path = "/flespi"
authorization = ["Bearer test-token"]
on_invalid = "reject"
"""


def send_partial_body(port: int, declared: int, sent: bytes) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(
        b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(declared).encode()
        + b"\r\n\r\n"
        + sent
    )
    return raw


async def reply_on(raw: socket.socket) -> bytes:
    """The receiver's first reply on a raw connection, which is closed afterwards."""
    try:
        raw.settimeout(5)
        return await asyncio.to_thread(raw.recv, 4096)
    finally:
        raw.close()


# device-state tests: a message with an ident and a device time
def message(ident: str | None, ts: float | None, **fields: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"ident": ident, "timestamp": ts, **fields}
    return {k: v for k, v in found.items() if v is not None}


async def send(client: Any, *messages: dict[str, Any]) -> dict[str, int]:
    reply = await client.post("/flespi", data=orjson.dumps(list(messages)), headers=AUTH)
    assert reply.status == 200
    result: dict[str, int] = await reply.json()
    return result


async def state(db: asyncpg.Connection, ident: str = "A") -> asyncpg.Record:
    return await db.fetchrow(
        "SELECT * FROM device_state WHERE stream = 'main' AND ident = $1", ident
    )


WRITE_LOCKS = """
SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
WHERE a.application_name = 'flespi-receiver' AND l.mode = 'RowExclusiveLock' AND l.granted
  AND l.relation = to_regclass('flespi.' || $1)
"""


async def wait_for_writer(db: asyncpg.Connection, table: str = "messages") -> None:
    """Until a receiver backend is writing into `table` (a batch being stored, uncommitted)."""
    for _ in range(250):
        if await db.fetchval(WRITE_LOCKS, table):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no receiver is writing into {table}")


def append_toml(config: Path, text: str) -> Path:
    """The config with `text` (top-level tables such as [partitioning]) added at its end."""
    config.write_text(config.read_text() + text)
    return config


async def start_command(command: str, config: Path) -> asyncio.subprocess.Process:
    """`flespi-receiver COMMAND --config CONFIG` as its own process, output captured."""
    return await asyncio.create_subprocess_exec(
        str(SCRIPT),
        command,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finished(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """Its exit status and standard error, once it has exited (within a minute)."""
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's memory figure from /proc/<pid>/status (VmRSS, VmHWM...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def reset_peak(pid: int) -> None:
    """VmHWM becomes the present resident size (proc(5), clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@asynccontextmanager
async def receiver_of_its_own(
    tmp_path: Path, database_url: str, max_body_size: int
) -> AsyncIterator[tuple[aiohttp.ClientSession, str, int]]:
    """`flespi-receiver serve` in a process of its own, so that its peak memory is what the
    test sends: (a session, the stream's URL, the process id), after one small batch, so that
    what any batch loads is in the baseline."""
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    config.write_text(
        config.read_text().replace("[server]\n", f"[server]\nmax_body_size = {max_body_size}\n")
    )
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/flespi"
            async with session.post(url, data=b'[{"a":1}]', headers=AUTH) as reply:
                assert reply.status == 200
            yield session, url, process.pid
