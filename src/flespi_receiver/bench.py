"""`flespi-receiver bench`: the receiver against the database's own limit and a naive receiver.

In one run, on the same rows and the same database: raw COPY of the rows into a copy of
`messages` (the limit), the receiver as its own process fed by the stream emulator, and the
naive quick-start receiver fed the same way. Prints a table and one JSON line.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from flespi_receiver.copy_format import copy_chunks
from flespi_receiver.embedded import free_port
from flespi_receiver.emulator import StreamEmulator, batches_of, encode_messages, sample_messages
from flespi_receiver.fields import MESSAGE_COLUMNS
from flespi_receiver.messages import Message
from flespi_receiver.migrate import create_migrated_database

BENCH_DATABASE = "flespi_bench"
SCHEMA = "flespi"
COUNT_STORED = "SELECT count(*) FROM flespi.messages"
COPY_RUN, RECEIVER_RUN, NAIVE_RUN = "COPY (database limit)", "flespi-receiver", "naive receiver"
TOKEN = "Bearer bench"  # noqa: S105 - the benchmark's own throwaway receiver


@dataclass
class Run:
    name: str
    batch_size: int
    messages: int
    seconds: float
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def prepare_database(admin_url: str) -> str:
    url = await create_migrated_database(admin_url, BENCH_DATABASE, SCHEMA)
    conn = await asyncpg.connect(url)
    try:
        for table in ("copy_reference", "naive_reference"):
            await conn.execute(
                f"CREATE TABLE {SCHEMA}.{table} (LIKE {SCHEMA}.messages INCLUDING ALL)"
            )
    finally:
        await conn.close()
    return url


async def reset_tables(conn: asyncpg.Connection) -> None:
    await conn.execute(
        f"TRUNCATE {SCHEMA}.messages, {SCHEMA}.copy_reference, {SCHEMA}.naive_reference, "
        f"{SCHEMA}.rejected_messages"
    )
    await conn.execute("CHECKPOINT")


async def copy_reference(conn: asyncpg.Connection, encoded: Sequence[bytes], size: int) -> Run:
    """The database's limit: COPY of the same rows, one transaction per batch."""
    # the rows are encoded before the clock starts: only PostgreSQL's work is timed
    batches = [
        b"".join(copy_chunks("main", (Message(raw, orjson.loads(raw)) for raw in batch)))
        for batch in batches_of(encoded, size)
    ]
    started = time.perf_counter()
    for data in batches:
        async with conn.transaction():
            await conn.copy_to_table(
                "copy_reference",
                schema_name=SCHEMA,
                source=io.BytesIO(data),
                columns=MESSAGE_COLUMNS,
                format="binary",
            )
    return Run(COPY_RUN, size, len(encoded), time.perf_counter() - started)


@contextmanager
def process(
    command: list[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def emulated_run(
    name: str,
    url: str,
    proc: subprocess.Popen[bytes],
    encoded: Sequence[bytes],
    size: int,
    gzip_level: int | None,
) -> Run:
    emulator = StreamEmulator(url, authorization=TOKEN, gzip_level=gzip_level, max_attempts=20)
    started = time.perf_counter()
    stats = await emulator.run(encoded, size)
    seconds = time.perf_counter() - started
    if stats.non_200 or stats.connection_errors:
        raise RuntimeError(f"{name}: {stats.statuses}, {stats.connection_errors} connection errors")
    times = sorted(stats.reply_times)
    return Run(
        name,
        size,
        len(encoded),
        seconds,
        p50_ms=statistics.median(times) * 1000,
        p99_ms=times[min(len(times) - 1, int(len(times) * 0.99))] * 1000,
        max_ms=times[-1] * 1000,
        peak_rss_mb=peak_rss_mb(proc.pid),
    )


def receiver_config(
    directory: Path, url: str, port: int, max_body: int, device_state: bool = False
) -> Path:
    """The receiver's config; without device state it does what COPY does: store the rows."""
    config = directory / "bench.toml"
    state = "true" if device_state else 'false\nnotify_channel = ""'
    config.write_text(
        f'[server]\nport = {port}\nmax_body_size = {max_body}\n[log]\nformat = "json"\n'
        f'[database]\nurl = "{url}"\nschema = "{SCHEMA}"\ndevice_state = {state}\n'
        f'[[streams]]\nname = "main"\npath = "/flespi"\nauthorization = ["{TOKEN}"]\n'
    )
    return config


async def bench_batch_size(
    url: str, size: int, count: int, gzip_level: int | None, workdir: Path, device_state: bool
) -> list[Run]:
    encoded = encode_messages(sample_messages(count, seed=size))
    conn = await asyncpg.connect(url, server_settings={"synchronous_commit": "on"})
    try:
        await reset_tables(conn)
        runs = [await copy_reference(conn, encoded, size)]
        await reset_tables(conn)
        port = free_port()
        config = receiver_config(workdir, url, port, 512 * 1024 * 1024, device_state)
        with process(
            [sys.executable, "-m", "flespi_receiver", "serve", "--config", str(config)]
        ) as proc:
            await wait_for_port(port, proc)
            runs.append(
                await emulated_run(
                    RECEIVER_RUN,
                    f"http://127.0.0.1:{port}/flespi",
                    proc,
                    encoded,
                    size,
                    gzip_level,
                )
            )
        stored = await conn.fetchval(COUNT_STORED)
        if stored != count:
            raise RuntimeError(f"receiver stored {stored} of {count} messages")
        await reset_tables(conn)
        port = free_port()
        naive = [
            sys.executable,
            "-m",
            "flespi_receiver.naive",
            url,
            str(port),
            f"{SCHEMA}.naive_reference",
        ]
        with process(naive) as proc:
            await wait_for_port(port, proc)
            runs.append(
                await emulated_run(
                    NAIVE_RUN,
                    f"http://127.0.0.1:{port}/flespi",
                    proc,
                    encoded,
                    size,
                    gzip_level,
                )
            )
    finally:
        await conn.close()
    return runs


def paired_ratios(rounds: list[list[Run]]) -> dict[str, list[float]]:
    """Receiver against each reference within the same round: the noise they share cancels."""
    ratios: dict[str, list[float]] = {"receiver_vs_copy": [], "receiver_vs_naive": []}
    for round_runs in rounds:
        by_name = {r.name: r for r in round_runs}
        receiver = by_name[RECEIVER_RUN].rate
        ratios["receiver_vs_copy"].append(receiver / by_name[COPY_RUN].rate)
        ratios["receiver_vs_naive"].append(receiver / by_name[NAIVE_RUN].rate)
    return ratios


def report(runs: list[Run], round_ratios: dict[int, dict[str, list[float]]]) -> dict[str, Any]:
    header = (
        f"{'batch':>6} {'run':<22} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'RSS MB':>7}"
    )
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {"batches": []}
    for size in sorted({r.batch_size for r in runs}):
        group = {r.name: r for r in runs if r.batch_size == size}
        for r in group.values():
            print(
                f"{size:>6} {r.name:<22} {r.rate:>9.0f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} "
                f"{r.max_ms:>8.1f} {r.peak_rss_mb:>7.0f}"
            )
        per_round = round_ratios[size]
        ratios = {name: statistics.median(values) for name, values in per_round.items()}
        spread = {name: (min(values), max(values)) for name, values in per_round.items()}
        print(
            f"{size:>6} {'ratios (median of rounds)':<22} "
            f"receiver/COPY {ratios['receiver_vs_copy']:.2f} "
            f"[{spread['receiver_vs_copy'][0]:.2f}-{spread['receiver_vs_copy'][1]:.2f}]  "
            f"receiver/naive {ratios['receiver_vs_naive']:.2f} "
            f"[{spread['receiver_vs_naive'][0]:.2f}-{spread['receiver_vs_naive'][1]:.2f}]"
        )
        summary["batches"].append(
            {
                "batch_size": size,
                **{r.name: {**asdict(r), "rate": round(r.rate)} for r in group.values()},
                **{k: round(v, 3) for k, v in ratios.items()},
                "rounds": {k: [round(v, 3) for v in values] for k, values in per_round.items()},
            }
        )
    return summary


def median_run(rounds: list[Run]) -> Run:
    """The round with the median rate: one noisy round on a shared machine does not decide."""
    return sorted(rounds, key=lambda r: r.rate)[len(rounds) // 2]


async def run_benchmark(
    admin_url: str,
    sizes: list[int],
    count: int,
    gzip_level: int | None,
    rounds: int = 3,
    device_state: bool = False,
) -> dict[str, Any]:
    url = await prepare_database(admin_url)
    runs: list[Run] = []
    round_ratios: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for size in sizes:
            # tiny batches are slow by nature: fewer messages keep the run short
            messages = max(count if size >= 100 else count // 10, size * 10)
            # the three contenders take turns, so that a busy moment hits all of them alike
            measured = [
                await bench_batch_size(url, size, messages, gzip_level, Path(workdir), device_state)
                for _ in range(rounds)
            ]
            runs.extend(median_run(list(group)) for group in zip(*measured, strict=True))
            round_ratios[size] = paired_ratios(measured)
    summary = report(runs, round_ratios)
    summary.update(cpus=os.cpu_count(), count=count, gzip=gzip_level is not None, rounds=rounds)
    print(orjson.dumps(summary).decode())
    return summary
