"""`flespi-receiver emulate URL`: act as a flespi stream against any receiver."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import orjson

from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command
from flespi_receiver.errors import CommandFailed


def register(commands: Subcommands) -> None:
    emulate = add_command(
        commands,
        "emulate",
        "send realistic messages to URL like a flespi stream: one request at a time, "
        "the same batch again until it gets a 200",
        run,
        config=False,
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


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_emulate(args))
    except RuntimeError as exc:  # a batch never acknowledged
        raise CommandFailed(str(exc)) from None


async def _emulate(args: argparse.Namespace) -> int:
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
    return EXIT_OK
