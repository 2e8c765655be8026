"""`flespi-receiver bench --spelling all`: every JSON spelling against compact, in one run.

One receiver process with one stream per spelling; in each round COPY (the database's limit)
and the receiver fed each spelling take turns of TURN_MESSAGES messages, in rotating order,
on the same messages and fresh tables. Each spelling's rate is given as a fraction of the
compact rate of the same round, so that the machine's load, which changes from one minute to
the next on a shared machine, hits every spelling alike. Prints a table and one JSON line.
"""

from __future__ import annotations

import contextlib
import gzip
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from flespi_receiver.bench import (
    CONFIGURATIONS,
    COPY_RUN,
    SCHEMA,
    TOKEN,
    Workload,
    copy_batch,
    copy_batches,
    prepare_database,
    process,
    reset_tables,
    wait_for_port,
)
from flespi_receiver.embedded import free_port
from flespi_receiver.emulator import StreamEmulator, batches_of, encode_messages, sample_messages
from flespi_receiver.progress import progress_bar
from flespi_receiver.spellings import SPELLINGS, spelled
from flespi_receiver.splitter import BOM

# messages per turn (at least one batch): short turns, as every spelling goes to the same
# receiver process, which stays warm; the shorter the turns, the more alike the load they see
TURN_MESSAGES = 1000
# the compact messages in a body that starts with a UTF-8 byte order mark, which RFC 8259 lets
# a parser skip
WITH_BOM = "bom"
VARIANTS = (*SPELLINGS, WITH_BOM)


class _EmulatorWithBom(StreamEmulator):
    """Sends each body with a byte order mark before the array (gzipped with it)."""

    def _body(self, messages: Sequence[bytes]) -> bytes:
        body = BOM + b"[" + b",".join(messages) + b"]"
        return body if self.gzip_level is None else gzip.compress(body, self.gzip_level)


def _texts(messages: list[dict[str, Any]], encoded: list[bytes], variant: str) -> list[bytes]:
    if variant in ("compact", WITH_BOM):
        return encoded
    return [spelled(m, variant) for m in messages]  # type: ignore[arg-type]


def cpu_seconds(pid: int | str) -> float:
    """CPU time the process's threads have run so far, in seconds (from the scheduler's own
    count in nanoseconds, /proc/<pid>/task/<tid>/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


@dataclass
class Round:
    """One round: messages per second of COPY and of each spelling's turns, and the
    receiver's CPU time per batch of each spelling, in milliseconds."""

    rates: dict[str, float]
    cpu_ms: dict[str, float]


def spelling_config(directory: Path, url: str, port: int, workload: Workload) -> Path:
    """The receiver's config: one stream per variant, at /<variant>, all alike otherwise."""
    streams = "".join(
        f'[[streams]]\nname = "{name}"\npath = "/{name}"\nauthorization = ["{TOKEN}"]\n'
        f'identity = "{workload.identity}"\n'
        for name in VARIANTS
    )
    config = directory / "bench-spelling.toml"
    config.write_text(
        f'[server]\nport = {port}\nmax_body_size = {512 * 1024 * 1024}\n[log]\nformat = "json"\n'
        f'[database]\nurl = "{url}"\nschema = "{SCHEMA}"\n{CONFIGURATIONS[workload.configuration]}'
        f"{streams}"
    )
    return config


async def spelling_round(
    url: str,
    spellings: Sequence[str],
    size: int,
    count: int,
    workload: Workload,
    workdir: Path,
    round_number: int,
) -> Round:
    """One round: COPY and the receiver fed each spelling take turns."""
    messages = sample_messages(count, seed=size, devices=workload.devices)
    encoded = encode_messages(messages)
    batches: dict[str, list[Sequence[bytes]]] = {
        s: list(batches_of(_texts(messages, encoded, s), size)) for s in spellings
    }
    copy_data = copy_batches(encoded, size)
    port = free_port()
    config = spelling_config(workdir, url, port, workload)
    serve = [sys.executable, "-m", "flespi_receiver", "serve", "--config", str(config)]
    conn = await asyncpg.connect(url, server_settings={"synchronous_commit": "on"})
    try:
        await reset_tables(conn)
        with process(serve) as proc:
            await wait_for_port(port, proc)
            emulators: dict[str, StreamEmulator] = {
                s: (_EmulatorWithBom if s == WITH_BOM else StreamEmulator)(
                    f"http://127.0.0.1:{port}/{s}",
                    authorization=TOKEN,
                    gzip_level=workload.gzip_level,
                    max_attempts=20,
                )
                for s in spellings
            }
            names = [COPY_RUN, *spellings]
            # made before any clock starts, as the COPY data is
            bodies = {s: [emulators[s].body_of(b) for b in batches[s]] for s in spellings}
            seconds = dict.fromkeys(names, 0.0)
            cpu = dict.fromkeys(spellings, 0.0)
            per_turn = max(1, TURN_MESSAGES // size)
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for turn, start in enumerate(range(0, len(copy_data), per_turn)):
                    first = (turn + round_number) % len(names)
                    for name in names[first:] + names[:first]:
                        started = time.perf_counter()
                        used = cpu_seconds(proc.pid)
                        for number in range(start, min(start + per_turn, len(copy_data))):
                            if name == COPY_RUN:
                                await copy_batch(conn, copy_data[number])
                            else:
                                await emulators[name].deliver(
                                    session, batches[name][number], bodies[name][number]
                                )
                        seconds[name] += time.perf_counter() - started
                        if name != COPY_RUN:
                            cpu[name] += cpu_seconds(proc.pid) - used
        for name, emulator in emulators.items():
            stats = emulator.stats
            if stats.non_200 or stats.connection_errors or stats.stored != count:
                raise RuntimeError(
                    f"{name}: {stats.statuses}, {stats.connection_errors} connection errors, "
                    f"{stats.stored} of {count} stored"
                )
        for table, expected in (("messages", count * len(spellings)), ("copy_reference", count)):
            stored = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.{table}")  # noqa: S608
            if stored != expected:
                raise RuntimeError(f"{table} holds {stored} of {expected} messages")
    finally:
        await conn.close()
    return Round(
        rates={name: count / seconds[name] for name in names},
        cpu_ms={name: used * 1000 / len(copy_data) for name, used in cpu.items()},
    )


def _median_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def spelling_report(
    rounds: list[Round], spellings: Sequence[str], body_bytes: dict[str, int]
) -> dict[str, Any]:
    """The table: per spelling its median rate, its rate over COPY's and over compact's of the
    same round (median of the rounds, with their range), and the receiver's CPU time per
    batch (median of the rounds), also over compact's."""
    header = (
        f"{'spelling':<9} {'KB/batch':>8} {'msg/s':>8} {'receiver/COPY':>18} "
        f"{'of compact':>18} {'CPU ms/batch':>13} {'of compact':>10}"
    )
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {"spellings": {}}
    for spelling in spellings:
        rate = statistics.median(r.rates[spelling] for r in rounds)
        vs_copy = _median_range([r.rates[spelling] / r.rates[COPY_RUN] for r in rounds])
        of_compact = [r.rates[spelling] / r.rates["compact"] for r in rounds]
        vs_compact = _median_range(of_compact)
        cpu = statistics.median(r.cpu_ms[spelling] for r in rounds)
        cpu_of_compact = statistics.median(r.cpu_ms[spelling] / r.cpu_ms["compact"] for r in rounds)
        print(
            f"{spelling:<9} {body_bytes[spelling] / 1024:>8.0f} {rate:>8.0f} "
            f"{vs_copy[0]:>5.2f} [{vs_copy[1]:.2f}-{vs_copy[2]:.2f}] "
            f"{vs_compact[0]:>5.2f} [{vs_compact[1]:.2f}-{vs_compact[2]:.2f}] "
            f"{cpu:>13.1f} {cpu_of_compact:>10.2f}"
        )
        summary["spellings"][spelling] = {
            "rate": round(rate),
            "body_bytes": body_bytes[spelling],
            "vs_copy": round(vs_copy[0], 3),
            "of_compact": round(vs_compact[0], 3),
            "rounds_of_compact": [round(v, 3) for v in of_compact],
            "cpu_ms_per_batch": round(cpu, 2),
            "cpu_of_compact": round(cpu_of_compact, 3),
        }
    copy_rate = statistics.median(r.rates[COPY_RUN] for r in rounds)
    print(f"{'COPY':<9} {'':>8} {copy_rate:>8.0f}")
    summary["copy_rate"] = round(copy_rate)
    return summary


async def run_spelling_benchmark(
    admin_url: str,
    spellings: Sequence[str],
    size: int,
    count: int,
    workload: Workload,
    rounds: int = 3,
) -> dict[str, Any]:
    """Every spelling in `spellings` (compact is always one: the others are fractions of it),
    batches of `size`, `count` messages per spelling and round."""
    spellings = ["compact", *(s for s in spellings if s != "compact")]  # compact's turn first
    url = await prepare_database(admin_url)
    measured: list[Round] = []
    bar = progress_bar(rounds, "rounds", "benchmark")
    with tempfile.TemporaryDirectory() as workdir, bar:
        for number in range(1, rounds + 1):
            bar.set_description(f"spellings, round {number}/{rounds}")
            measured.append(
                await spelling_round(url, spellings, size, count, workload, Path(workdir), number)
            )
            bar.update(1)
    sample = sample_messages(size, seed=size, devices=workload.devices)
    encoded = encode_messages(sample)
    body_bytes = {
        s: sum(len(t) + 1 for t in _texts(sample, encoded, s)) + 1 + len(BOM) * (s == WITH_BOM)
        for s in spellings
    }
    print(
        f"batch {size}; {count} messages per spelling and round; {rounds} rounds; receiver "
        f"configuration: {workload.configuration}; gzip "
        f"{'on' if workload.gzip_level is not None else 'off'}; identity {workload.identity}"
    )
    summary = spelling_report(measured, spellings, body_bytes)
    summary.update(
        batch_size=size,
        count=count,
        rounds=rounds,
        gzip=workload.gzip_level is not None,
        identity=workload.identity,
        configuration=workload.configuration,
        devices=workload.devices,
    )
    print(orjson.dumps(summary).decode())
    return summary
