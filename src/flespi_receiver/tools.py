"""The load tools of the command line: `bench` and `emulate`."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import orjson

TOOL_COMMANDS = ("bench", "emulate")


def add_tool_commands(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure the receiver against raw COPY and a naive receiver",
        description="Measure the receiver against raw COPY and a naive receiver, on one database.",
    )
    bench.add_argument("--database-url", help="an existing server (default: embedded)")
    bench.add_argument(
        "--data-dir",
        default=".data/bench-postgres",
        type=Path,
        help="embedded server folder (default: %(default)s)",
    )
    bench.add_argument("--count", type=int, default=20000, help="messages per run")
    bench.add_argument(
        "--batch-size",
        type=int,
        action="append",
        dest="batch_sizes",
        help="messages per batch; repeat for several (default: 1000)",
    )
    bench.add_argument("--gzip", action="store_true", help="gzip the request bodies")
    bench.add_argument(
        "--device-state",
        action="store_true",
        help="keep device_state and send NOTIFY as by default (off: store rows only, like COPY)",
    )
    bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each contender; the median is reported (default: 3)",
    )
    bench.add_argument(
        "--growth",
        type=int,
        metavar="ROWS",
        help="instead: the receiver's rate as the table grows to ROWS rows",
    )
    bench.add_argument("--growth-step", type=int, default=1_000_000, metavar="ROWS")
    bench.add_argument(
        "--memory",
        type=int,
        metavar="MESSAGES",
        help="instead: peak RSS while ingesting MESSAGES, then one body of --max-body-size",
    )
    bench.add_argument("--max-body-size", type=int, default=64 * 1024 * 1024)

    emulate = commands.add_parser(
        "emulate",
        help="send realistic messages to a URL the way a flespi stream does",
        description="Send realistic messages to URL like a flespi stream: one request at a "
        "time, the same batch again until it gets a 200.",
    )
    emulate.add_argument("url")
    emulate.add_argument("--count", type=int, default=10000, help="messages to send")
    emulate.add_argument("--batch-size", type=int, default=1000)
    emulate.add_argument(
        "--authorization",
        default=os.environ.get("FLESPI_EMULATE_AUTHORIZATION"),
        help="Authorization header value (or $FLESPI_EMULATE_AUTHORIZATION)",
    )
    emulate.add_argument("--gzip", action="store_true", help="gzip the request bodies")
    emulate.add_argument(
        "--resend-rate",
        type=float,
        default=0.0,
        help="share of acknowledged batches sent again, as after a lost reply",
    )
    emulate.add_argument("--seed", type=int, default=0)
    emulate.add_argument(
        "--max-attempts",
        type=int,
        help="give up on a batch after this many tries (default: retry forever, as flespi does)",
    )


def run_tool(args: argparse.Namespace) -> int:
    try:
        if args.command == "bench":
            return _bench(args)
        return asyncio.run(_emulate(args))
    except RuntimeError as exc:  # a batch never acknowledged, a receiver that did not start
        print(f"flespi-receiver {args.command}: {exc}", file=sys.stderr)
        return 1


def _bench(args: argparse.Namespace) -> int:
    if args.database_url:
        asyncio.run(_bench_on(args.database_url, args))
        return 0
    from flespi_receiver.embedded import EmbeddedPostgres

    with EmbeddedPostgres(args.data_dir) as url:
        asyncio.run(_bench_on(url, args))
    return 0


async def _bench_on(url: str, args: argparse.Namespace) -> None:
    from flespi_receiver import bench, bench_scale

    sizes = args.batch_sizes or [1000]
    if args.growth:
        await bench_scale.growth_curve(url, args.growth, args.growth_step, sizes[0], args.count)
    elif args.memory:
        await bench_scale.memory_profile(url, args.memory, args.max_body_size)
    else:
        gzip_level = 6 if args.gzip else None
        await bench.run_benchmark(
            url, sizes, args.count, gzip_level, args.rounds, args.device_state
        )


async def _emulate(args: argparse.Namespace) -> int:
    import time

    from flespi_receiver.emulator import StreamEmulator, encode_messages, sample_messages

    messages = encode_messages(sample_messages(args.count, seed=args.seed))
    emulator = StreamEmulator(
        args.url,
        authorization=args.authorization,
        gzip_level=6 if args.gzip else None,
        resend_rate=args.resend_rate,
        seed=args.seed,
        max_attempts=args.max_attempts,
    )
    started = time.perf_counter()
    stats = await emulator.run(messages, args.batch_size)
    seconds = time.perf_counter() - started
    times = sorted(stats.reply_times) or [0.0]
    summary = {
        "messages": len(messages),
        "seconds": round(seconds, 3),
        "messages_per_second": round(len(messages) / seconds),
        "batches": stats.batches,
        "posts": stats.posts,
        "statuses": stats.statuses,
        "connection_errors": stats.connection_errors,
        "resent_acknowledged": stats.resent_acknowledged,
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
        "max_ms": round(times[-1] * 1000, 2),
    }
    print(orjson.dumps(summary, option=orjson.OPT_NON_STR_KEYS).decode())
    return 0
