"""`flespi-receiver bench`: the receiver against the database's own limit and a naive receiver.

In one run, on the same rows and the same database: raw COPY of the rows into a copy of
`messages` (the limit), the receiver as its own process fed by the stream emulator, and the
naive quick-start receiver fed the same way; with `bad_every`, the receiver again on the same
messages with one in so many made invalid, on a stream of its own. Prints a table and one
JSON line.
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

import aiohttp
import asyncpg
import orjson

from flespi_receiver.bench_model import model_cost
from flespi_receiver.copy_format import copy_chunks
from flespi_receiver.embedded import free_port
from flespi_receiver.emulator import StreamEmulator, batches_of, encode_messages, sample_messages
from flespi_receiver.fields import MESSAGE_COLUMNS, columns
from flespi_receiver.identity import Identity
from flespi_receiver.messages import Message
from flespi_receiver.migrate import create_migrated_database
from flespi_receiver.progress import progress_bar
from flespi_receiver.spellings import Spelling, spelled

BENCH_DATABASE = "flespi_bench"
SCHEMA = "flespi"
COUNT_STORED = "SELECT count(*) FROM flespi.messages"
COPY_RUN, RECEIVER_RUN, NAIVE_RUN = "COPY (database limit)", "flespi-receiver", "naive receiver"
BAD_RUN = "receiver, bad messages"
# messages each contender stores in its turn (at least one batch): long enough to be warm
# as a stream keeps a receiver warm, short enough for the turns to see the same machine
TURN_MESSAGES = 5000
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
            # the read position's index, which the receiver builds when it starts: the
            # references are shaped like messages as the receiver writes it
            await conn.execute(f"CREATE INDEX ON {SCHEMA}.{table} (xact_id)")
    finally:
        await conn.close()
    return url


async def reset_tables(conn: asyncpg.Connection) -> None:
    """Every round starts from empty tables, device state included: the same messages are sent
    again, and a state left from the last round would find every batch already older."""
    await conn.execute(
        f"TRUNCATE {SCHEMA}.messages, {SCHEMA}.copy_reference, {SCHEMA}.naive_reference, "
        f"{SCHEMA}.rejected_messages, {SCHEMA}.device_latest"
    )
    await conn.execute("CHECKPOINT")


def copy_batches(encoded: Sequence[bytes], size: int) -> list[bytes]:
    """The COPY data of each batch, made before any clock starts: only PostgreSQL's work is
    timed for the reference."""
    return [
        b"".join(copy_chunks("main", (_message(raw) for raw in batch)))
        for batch in batches_of(encoded, size)
    ]


def _message(raw: bytes) -> Message:
    data = orjson.loads(raw)
    return Message(raw, data, columns(data, raw))


async def copy_batch(conn: asyncpg.Connection, data: bytes) -> None:
    """The database's limit for one batch: COPY of its rows in a transaction of its own."""
    async with conn.transaction():
        await conn.copy_to_table(
            "copy_reference",
            schema_name=SCHEMA,
            source=io.BytesIO(data),
            columns=MESSAGE_COLUMNS,
            format="binary",
        )


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


def emulated_run(name: str, size: int, emulator: StreamEmulator, seconds: float, pid: int) -> Run:
    """A receiver's run from what its emulator saw, with the process's peak memory."""
    stats = emulator.stats
    if stats.non_200 or stats.connection_errors:
        raise RuntimeError(f"{name}: {stats.statuses}, {stats.connection_errors} connection errors")
    times = sorted(stats.reply_times)
    return Run(
        name,
        size,
        stats.messages_sent,
        seconds,
        p50_ms=statistics.median(times) * 1000,
        p99_ms=times[min(len(times) - 1, int(len(times) * 0.99))] * 1000,
        max_ms=times[-1] * 1000,
        peak_rss_mb=peak_rss_mb(pid),
    )


# what the receiver keeps besides the rows, as [database] settings
CONFIGURATIONS = {
    # device_state and NOTIFY, as `make run` and the Docker image run it
    "default": "",
    # device_state keeping the last known value of every parameter, and NOTIFY
    "merge": "device_state_merge = true\n",
    # nothing but the rows, like COPY
    "rows-only": 'device_state = false\nnotify_channel = ""\n',
}


def receiver_config(
    directory: Path,
    url: str,
    port: int,
    max_body: int,
    configuration: str = "default",
    identity: Identity = "text",
    streams: tuple[str, ...] = ("main",),
) -> Path:
    """The receiver's config file, in one of CONFIGURATIONS; `identity`: what the streams key
    their messages by (identity.py); `streams`: their names, each posting to /flespi/NAME
    (the first to /flespi)."""
    config = directory / "bench.toml"
    tables = "".join(
        f'[[streams]]\nname = "{name}"\npath = "/flespi{f"/{name}" if number else ""}"\n'
        f'authorization = ["{TOKEN}"]\nidentity = "{identity}"\n'
        for number, name in enumerate(streams)
    )
    config.write_text(
        f'[server]\nport = {port}\nmax_body_size = {max_body}\n[log]\nformat = "json"\n'
        f'[database]\nurl = "{url}"\nschema = "{SCHEMA}"\n{CONFIGURATIONS[configuration]}'
        f"{tables}"
    )
    return config


def with_bad_messages(messages: Sequence[bytes], every: int) -> list[bytes]:
    """The messages with one in `every` (the middle one of each `every`) made invalid by a
    duplicate key: its text with `"ident":"bad"` put before its own keys, about as long."""
    return [
        b'{"ident":"bad",' + raw[1:] if number % every == every // 2 else raw
        for number, raw in enumerate(messages)
    ]


@dataclass(frozen=True)
class Workload:
    """What is measured: the receiver's configuration, the fleet behind the messages, and how
    the receivers get them."""

    configuration: str = "default"
    # distinct devices the messages come from, in turn (a batch of consecutive messages holds
    # min(batch size, devices) of them)
    devices: int = 5000
    gzip_level: int | None = None
    spelling: Spelling = "compact"
    identity: Identity = "text"
    # also the receiver on the same messages with one in this many invalid (BAD_RUN)
    bad_every: int | None = None


async def bench_batch_size(
    url: str, size: int, count: int, workload: Workload, workdir: Path
) -> list[Run]:
    """One round: COPY, the receiver and the naive receiver take turns, batch by batch.

    Each contender's rate is its messages over the sum of its own batch times, so a busy
    moment on a shared machine hits all three alike instead of whichever ran then. The
    receivers get the messages in the workload's spelling; COPY gets the same rows as always.
    """
    messages = sample_messages(count, seed=size, devices=workload.devices)
    encoded = encode_messages(messages)
    spelling = workload.spelling
    sent = encoded if spelling == "compact" else [spelled(m, spelling) for m in messages]
    batches = list(batches_of(sent, size))
    copy_data = copy_batches(encoded, size)
    receiver_port, naive_port = free_port(), free_port()
    bad_every = workload.bad_every
    streams = ("main", "bad") if bad_every else ("main",)
    config = receiver_config(
        workdir,
        url,
        receiver_port,
        512 * 1024 * 1024,
        workload.configuration,
        workload.identity,
        streams,
    )
    serve = [sys.executable, "-m", "flespi_receiver", "serve", "--config", str(config)]
    naive = [
        sys.executable,
        "-m",
        "flespi_receiver.naive",
        url,
        str(naive_port),
        f"{SCHEMA}.naive_reference",
    ]
    conn = await asyncpg.connect(url, server_settings={"synchronous_commit": "on"})
    try:
        await reset_tables(conn)
        with process(serve) as receiver_proc, process(naive) as naive_proc:
            await wait_for_port(receiver_port, receiver_proc)
            await wait_for_port(naive_port, naive_proc)
            targets = [(RECEIVER_RUN, receiver_port, ""), (NAIVE_RUN, naive_port, "")]
            if bad_every:
                targets.append((BAD_RUN, receiver_port, "/bad"))
            emulators = {
                name: StreamEmulator(
                    f"http://127.0.0.1:{port}/flespi{stream_path}",
                    authorization=TOKEN,
                    gzip_level=workload.gzip_level,
                    max_attempts=20,
                )
                for name, port, stream_path in targets
            }
            bad_batches = (
                list(batches_of(with_bad_messages(sent, bad_every), size)) if bad_every else []
            )
            seconds = await take_turns(conn, batches, copy_data, emulators, bad_batches)
            # both receiver runs are the same process
            pids = {RECEIVER_RUN: receiver_proc.pid, NAIVE_RUN: naive_proc.pid}
            pids[BAD_RUN] = receiver_proc.pid
            runs = [Run(COPY_RUN, size, count, seconds[COPY_RUN])] + [
                emulated_run(name, size, emulators[name], seconds[name], pids[name])
                for name in emulators
            ]
        bad = len(range(bad_every // 2, count, bad_every)) if bad_every else 0
        expected = {
            "messages": count + (count - bad if bad_every else 0),
            "copy_reference": count,
            "naive_reference": count,
            "rejected_messages": bad,
        }
        for table, wanted in expected.items():
            stored = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.{table}")  # noqa: S608
            if stored != wanted:
                raise RuntimeError(f"{table} holds {stored} of {wanted} rows")
    finally:
        await conn.close()
    return runs


async def take_turns(
    conn: asyncpg.Connection,
    batches: list[Sequence[bytes]],
    copy_data: list[bytes],
    emulators: dict[str, StreamEmulator],
    bad_batches: list[Sequence[bytes]] | None = None,
) -> dict[str, float]:
    """The contenders take turns of TURN_MESSAGES messages (the order rotating), each one's
    batch times summed; BAD_RUN sends `bad_batches` instead of `batches`. The bodies are made
    before any clock starts, as the COPY data is: only the receivers' work and the HTTP
    exchange are timed (the emulators share one gzip level)."""
    maker = next(iter(emulators.values()))
    bodies = [maker.body_of(batch) for batch in batches]
    bad_bodies = [maker.body_of(batch) for batch in bad_batches or []]
    seconds = dict.fromkeys((COPY_RUN, *emulators), 0.0)
    names = list(seconds)
    per_turn = max(1, TURN_MESSAGES // len(batches[0]))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for turn, start in enumerate(range(0, len(batches), per_turn)):
            first = turn % len(names)
            for name in names[first:] + names[:first]:
                started = time.perf_counter()
                for number in range(start, min(start + per_turn, len(batches))):
                    if name == COPY_RUN:
                        await copy_batch(conn, copy_data[number])
                    elif name == BAD_RUN and bad_batches:
                        await emulators[name].deliver(
                            session, bad_batches[number], bad_bodies[number]
                        )
                    else:
                        await emulators[name].deliver(session, batches[number], bodies[number])
                seconds[name] += time.perf_counter() - started
    return seconds


def paired_ratios(rounds: list[list[Run]]) -> dict[str, list[float]]:
    """Receiver against each reference within the same round: the noise they share cancels."""
    ratios: dict[str, list[float]] = {"receiver_vs_copy": [], "receiver_vs_naive": []}
    for round_runs in rounds:
        by_name = {r.name: r for r in round_runs}
        receiver = by_name[RECEIVER_RUN].rate
        ratios["receiver_vs_copy"].append(receiver / by_name[COPY_RUN].rate)
        ratios["receiver_vs_naive"].append(receiver / by_name[NAIVE_RUN].rate)
        if BAD_RUN in by_name:
            bad = by_name[BAD_RUN].rate
            ratios.setdefault("bad_vs_copy", []).append(bad / by_name[COPY_RUN].rate)
            ratios.setdefault("bad_vs_receiver", []).append(bad / receiver)
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
        if "bad_vs_copy" in ratios:
            print(
                f"{size:>6} {'with bad messages':<22} "
                f"receiver/COPY {ratios['bad_vs_copy']:.2f} "
                f"[{spread['bad_vs_copy'][0]:.2f}-{spread['bad_vs_copy'][1]:.2f}]  "
                f"of clean {ratios['bad_vs_receiver']:.2f} "
                f"[{spread['bad_vs_receiver'][0]:.2f}-{spread['bad_vs_receiver'][1]:.2f}]"
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
    admin_url: str, sizes: list[int], count: int, workload: Workload, rounds: int = 3
) -> dict[str, Any]:
    url = await prepare_database(admin_url)
    runs: list[Run] = []
    round_ratios: dict[int, dict[str, list[float]]] = {}
    bar = progress_bar(len(sizes) * rounds, "runs", "benchmark")
    with tempfile.TemporaryDirectory() as workdir, bar:
        for size in sizes:
            # tiny batches are slow by nature: fewer messages keep the run short
            messages = max(count if size >= 100 else count // 10, size * 10)
            # each round starts on empty tables; ratios are taken within a round
            measured = []
            for number in range(1, rounds + 1):
                bar.set_description(f"batch size {size}, round {number}/{rounds}")
                measured.append(
                    await bench_batch_size(url, size, messages, workload, Path(workdir))
                )
                bar.update(1)
            runs.extend(median_run(list(group)) for group in zip(*measured, strict=True))
            round_ratios[size] = paired_ratios(measured)
    print(
        f"receiver configuration: {workload.configuration}; messages from {workload.devices} "
        f"devices in turn; gzip {'on' if workload.gzip_level is not None else 'off'}"
        + (
            f"; {BAD_RUN!r}: one message in {workload.bad_every} has a duplicate key"
            if workload.bad_every
            else ""
        )
    )
    summary = report(runs, round_ratios)
    for batch in summary["batches"]:
        # the known-field model's share: messages like the run's (its generator and fleet)
        encoded = encode_messages(sample_messages(min(count, 5000), devices=workload.devices))
        cost = model_cost(encoded, batch[RECEIVER_RUN]["rate"], batch["receiver_vs_copy"])
        batch["known_field_model"] = cost
        print(
            f"{batch['batch_size']:>6} known-field model (pydantic): "
            f"{cost['model_us_per_message']:.2f} µs per message, "
            f"{cost['model_share_of_receiver']:.1%} of the receiver's time, "
            f"receiver/COPY lowered by {cost['ratio_lowered_by']:.3f}"
        )
    summary.update(
        cpus=os.cpu_count(),
        count=count,
        gzip=workload.gzip_level is not None,
        rounds=rounds,
        spelling=workload.spelling,
        identity=workload.identity,
        configuration=workload.configuration,
        devices=workload.devices,
        bad_every=workload.bad_every,
    )
    print(orjson.dumps(summary).decode())
    return summary
