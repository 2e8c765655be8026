"""`flespi-receiver bench`: the receiver against raw COPY and a naive receiver, on one database."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command
from flespi_receiver.errors import CommandFailed


def register(commands: Subcommands) -> None:
    bench = add_command(
        commands,
        "bench",
        "measure the receiver against raw COPY and a naive receiver, on one database",
        run,
        config=False,
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


def run(args: argparse.Namespace) -> int:
    try:
        if args.database_url:
            asyncio.run(_bench_on(args.database_url, args))
            return EXIT_OK
        from flespi_receiver.embedded import EmbeddedPostgres

        with EmbeddedPostgres(args.data_dir) as url:
            asyncio.run(_bench_on(url, args))
    except RuntimeError as exc:  # a batch never acknowledged, a receiver that did not start
        raise CommandFailed(str(exc)) from None
    return EXIT_OK


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
