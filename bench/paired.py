"""Two receivers (two versions, or one with other settings) and COPY, batch by batch.

    .venv/bin/python bench/paired.py --database-url postgresql://postgres:...@HOST/postgres \
        --python /work/main/.venv/bin/python --python .venv/bin/python \
        [--configuration default|merge|rows-only] [--devices 1000] [--batches 20] [--rounds 3]

`flespi-receiver bench` compares one receiver with COPY and a naive receiver in turns of five
batches; on a machine shared with other work, the difference between two versions of the
receiver is smaller than what moves between two runs. Here each `--python` (an interpreter
whose installed flespi_receiver is the version to measure) serves a stream of its own on a
database of its own (`flespi_bench_paired_1`, `_2`, made empty and migrated by that receiver
at its start: two versions with different schemas each run on their own), COPY goes to
`flespi_bench_paired`, and the two receivers and the COPY of the same rows take turns one
batch at a time, the order rotating, so that a busy moment hits them alike. Prints each
one's median reply, its process's CPU time per batch (all threads), its rate over COPY's per
round, and the second receiver's rate over the first's. A developer's tool, not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

from flespi_receiver import bench
from flespi_receiver.bench_spelling import cpu_seconds
from flespi_receiver.embedded import free_port
from flespi_receiver.emulator import StreamEmulator, batches_of, encode_messages, sample_messages
from flespi_receiver.migrate import create_empty_database

COPY = "COPY"


async def run(args: argparse.Namespace) -> None:
    bench.BENCH_DATABASE = "flespi_bench_paired"
    url = await bench.prepare_database(args.database_url)  # messages and the references
    conn = await asyncpg.connect(url, server_settings={"synchronous_commit": "on"})
    names = [f"receiver {n + 1}" for n in range(len(args.python))]
    receivers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    databases: list[asyncpg.Connection] = []
    try:
        with tempfile.TemporaryDirectory() as work:
            for number, (name, python) in enumerate(zip(names, args.python, strict=True)):
                folder = Path(work) / str(number)
                folder.mkdir()
                port = free_port()
                own = await create_empty_database(
                    args.database_url, f"flespi_bench_paired_{number + 1}"
                )
                config = bench.receiver_config(
                    folder,
                    own,
                    port,
                    512 * 1024 * 1024,
                    args.configuration,
                    streams=(f"s{number}",),
                )
                command = [python, "-m", "flespi_receiver", "serve", "--config", str(config)]
                # started once, before anything is timed
                proc = subprocess.Popen(  # noqa: ASYNC220
                    command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                receivers[name] = (port, proc)
                await bench.wait_for_port(port, proc)  # listening: its migrations are done
                databases.append(await asyncpg.connect(own))
            await take_turns(args, conn, names, receivers, databases)
    finally:
        for _, proc in receivers.values():
            proc.terminate()
            proc.wait(30)
        for database in databases:
            await database.close()
        await conn.close()


async def take_turns(
    args: argparse.Namespace,
    conn: asyncpg.Connection,
    names: list[str],
    receivers: dict[str, tuple[int, subprocess.Popen[bytes]]],
    databases: list[asyncpg.Connection],
) -> None:
    walls: dict[str, list[float]] = {name: [] for name in [*names, COPY]}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    of_copy: dict[str, list[float]] = {name: [] for name in names}
    contenders = [*names, COPY]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for number in range(args.rounds):
            await bench.reset_tables(conn)
            for database in databases:
                await database.execute(
                    f"TRUNCATE {bench.SCHEMA}.messages, {bench.SCHEMA}.rejected_messages, "
                    f"{bench.SCHEMA}.device_latest"
                )
            messages = sample_messages(args.batches * 1000, seed=number, devices=args.devices)
            encoded = encode_messages(messages)
            batches = list(batches_of(encoded, 1000))
            copy_data = bench.copy_batches(encoded, 1000)
            # made before any clock starts, as the COPY data is
            bodies = [b"[" + b",".join(batch) + b"]" for batch in batches]
            seconds = dict.fromkeys(contenders, 0.0)
            for index, batch in enumerate(batches):
                turn = index % len(contenders)
                for name in contenders[turn:] + contenders[:turn]:
                    started = time.perf_counter()
                    if name == COPY:
                        await bench.copy_batch(conn, copy_data[index])
                    else:
                        port, proc = receivers[name]
                        sender = StreamEmulator(
                            f"http://127.0.0.1:{port}/flespi",
                            authorization=bench.TOKEN,
                            max_attempts=3,
                        )
                        cpu = cpu_seconds(proc.pid)
                        await sender.deliver(session, batch, bodies[index])
                        cpus[name].append(cpu_seconds(proc.pid) - cpu)
                    took = time.perf_counter() - started
                    walls[name].append(took)
                    seconds[name] += took
            for name in names:
                of_copy[name].append(seconds[COPY] / seconds[name])
    for name in [*names, COPY]:
        line = f"{name:<11} reply p50 {statistics.median(walls[name]) * 1000:7.1f} ms"
        if name in cpus:
            line += (
                f"  CPU {statistics.median(cpus[name]) * 1000:6.1f} ms/batch"
                f"  rate/COPY {statistics.median(of_copy[name]):.3f} "
                f"({', '.join(f'{r:.2f}' for r in of_copy[name])})"
            )
        print(line)
    if len(names) == 2:
        first, second = (sum(walls[name]) for name in names)
        print(f"{names[1]} rate / {names[0]} rate: {first / second:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--python", action="append", required=True)
    parser.add_argument("--configuration", default="default", choices=bench.CONFIGURATIONS)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=20, help="batches of 1000 per round")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
