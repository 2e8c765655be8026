"""The load tools users run themselves: `emulate` against a receiver, `bench` end to end."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from flespi_receiver.embedded import free_port

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
    returncode, stdout, stderr = await emulate(
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
    assert stderr == b""  # piped: no progress bar, only the summary on stdout
    summary = orjson.loads(stdout)
    assert summary["messages"] == 250
    assert summary["statuses"] == {"200": summary["posts"]}
    assert summary["resent_acknowledged"] > 0
    assert await count(db) == 250
    # the receiver's own counts: what was sent again was a duplicate
    assert (summary["stored"], summary["duplicates"], summary["rejected"]) == (
        250,
        summary["resent_acknowledged"],
        0,
    )
    # current device times by default: the last message is from about now
    age = await db.fetchval("SELECT extract(epoch FROM now() - max(ts)) FROM messages")
    assert -5 < age < 120


async def test_emulate_rerun_with_a_fixed_start_is_all_duplicates(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    options = ("--count", "30", "--authorization", TOKEN, "--start-time", "2025-11-24T16:00:00")
    summaries = []
    for _ in range(2):
        returncode, stdout, stderr = await emulate(client, *options)
        assert returncode == 0, stderr
        summaries.append(orjson.loads(stdout))
    assert [(s["stored"], s["duplicates"]) for s in summaries] == [(30, 0), (0, 30)]
    assert summaries[0]["first_timestamp"] == 1764000000
    assert await count(db) == 30


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
    # what users run unless told otherwise: device_state and NOTIFY on
    assert (summary["configuration"], summary["devices"]) == ("default", 5000)
    assert "receiver configuration: default" in result.stdout


def test_bench_measures_other_configurations_and_fleets(pg_server: Server) -> None:
    _, summary = bench(
        pg_server,
        "--count",
        "300",
        "--batch-size",
        "100",
        "--rounds",
        "1",
        "--merge",
        "--devices",
        "20",
    )
    assert (summary["configuration"], summary["devices"]) == ("merge", 20)
    assert summary["batches"][0]["flespi-receiver"]["messages"] == 1000


def test_bench_measures_one_bad_message_per_batch(pg_server: Server) -> None:
    # the bench itself fails unless the bad stream stored all but one message in 100 and
    # quarantined those
    result, summary = bench(
        pg_server, "--count", "300", "--batch-size", "100", "--rounds", "1", "--bad-every", "100"
    )
    (run,) = summary["batches"]
    assert summary["bad_every"] == 100
    assert run["receiver, bad messages"]["messages"] == 1000
    assert run["bad_vs_copy"] > 0
    assert run["bad_vs_receiver"] > 0
    assert "with bad messages" in result.stdout


def test_bench_compares_spellings_in_one_run(pg_server: Server) -> None:
    args = ("--count", "300", "--batch-size", "100", "--rounds", "2")
    result, summary = bench(pg_server, *args, "--spelling", "all")
    spellings = summary["spellings"]
    assert list(spellings) == ["compact", "spaced", "escaped", "pretty", "numbers", "bom"]
    assert spellings["compact"]["rounds_of_compact"] == [1.0, 1.0]
    assert all(s["of_compact"] > 0 and s["vs_copy"] > 0 for s in spellings.values())
    assert all(s["cpu_ms_per_batch"] > 0 for s in spellings.values())
    # the same messages, spelled longer than compact
    assert spellings["compact"]["body_bytes"] < spellings["pretty"]["body_bytes"]
    assert spellings["compact"]["body_bytes"] < spellings["bom"]["body_bytes"]
    assert "of compact" in result.stdout
    # compact's turn is always there: the others are fractions of it
    _, summary = bench(pg_server, *args, "--spelling", "pretty", "--spelling", "escaped")
    assert list(summary["spellings"]) == ["compact", "escaped", "pretty"]


def test_growth_and_memory_benchmarks_run(pg_server: Server) -> None:
    _, growth = bench(pg_server, "--growth", "2000", "--growth-step", "1000", "--count", "300")
    # each point is measured three times with 300 new messages
    assert [point["rows"] for point in growth["growth"]] == [0, 1900, 3800]
    _, memory = bench(pg_server, "--memory", "3000", "--max-body-size", "4194304")
    assert memory["messages_streamed"] == 3000
    assert 3.9 < memory["big_body_mb"] <= 4.0


async def test_emulate_stops_on_a_wrong_token(receiver: ClientFactory) -> None:
    client = await receiver()
    returncode, stdout, stderr = await emulate(
        client, "--count", "10", "--authorization", "Bearer wrong"
    )
    assert returncode == 1
    assert b"answered 401" in stderr
    assert b"check --authorization" in stderr
    assert b"Traceback" not in stderr
    assert stdout == b""


async def test_emulate_stops_when_nothing_listens() -> None:
    url = f"http://127.0.0.1:{free_port()}/flespi"
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT), "emulate", url, "--count", "5", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert f"cannot connect to {url}".encode() in stderr
    assert b"Traceback" not in stderr


async def test_emulate_shows_progress_on_a_terminal(receiver: ClientFactory) -> None:
    client = await receiver()
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns

    def read_terminal() -> bytes:
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process closed its end
                return shown
            if not chunk:
                return shown
            shown += chunk

    try:
        process = await asyncio.create_subprocess_exec(
            str(SCRIPT),
            "emulate",
            str(client.make_url("/flespi")),
            "--count",
            "200",
            "--batch-size",
            "20",
            "--authorization",
            TOKEN,
            stdout=subprocess.PIPE,
            stderr=terminal,
            env={**os.environ, "TQDM_MININTERVAL": "0"},  # draw every update, however fast
        )
        os.close(terminal)  # the process holds the terminal now; read it while it runs
        reading = asyncio.create_task(asyncio.to_thread(read_terminal))
        stdout, _ = await process.communicate()
        shown = await asyncio.wait_for(reading, 30)
    finally:
        os.close(controller)
    assert process.returncode == 0
    assert orjson.loads(stdout)["stored"] == 200  # stdout stays machine-readable
    assert b"200/200" in shown
    assert b"msg/s" in shown
    assert b"stored 200, duplicates 0, rejected 0" in shown, shown.decode(errors="replace")


def test_bench_says_where_its_data_is_and_removes_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "bench-postgres"
    result = subprocess.run(
        [
            *(str(SCRIPT), "bench", "--data-dir", str(data_dir)),
            *("--count", "200", "--batch-size", "100", "--rounds", "1"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"embedded PostgreSQL in {data_dir}" in result.stderr
    assert "--keep keeps it" in result.stderr
    assert not data_dir.exists()
    assert "receiver/COPY" in result.stdout
