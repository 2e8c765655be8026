"""`flespi-receiver emulate URL`: act as a flespi stream against any receiver."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from datetime import UTC, datetime

import orjson

from flespi_receiver.cli.arguments import http_url, integer, share
from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command
from flespi_receiver.errors import CommandFailed
from flespi_receiver.progress import progress_bar

# tries of one batch against 5xx replies: with the waits between them, about a minute
DEFAULT_ATTEMPTS = 30


def _start_time(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither seconds since the epoch nor an ISO 8601 time"
        ) from None
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp())


def register(commands: Subcommands) -> None:
    emulate = add_command(
        commands,
        "emulate",
        "send realistic messages to URL like a flespi stream: one request at a time, "
        "the same batch again until it gets a 200",
        run,
        config=False,
    )
    emulate.add_argument("url", type=http_url)
    emulate.add_argument("--count", type=integer(1), default=10000, help="messages to send")
    emulate.add_argument("--batch-size", type=integer(1), default=1000)
    emulate.add_argument(
        "--authorization",
        default=os.environ.get("FLESPI_EMULATE_AUTHORIZATION"),
        help="Authorization header value (or $FLESPI_EMULATE_AUTHORIZATION)",
    )
    emulate.add_argument("--gzip", action="store_true", help="gzip the request bodies")
    emulate.add_argument(
        "--resend-rate",
        type=share,
        default=0.0,
        help="share of acknowledged batches sent again, as after a lost reply (0 to 1)",
    )
    emulate.add_argument("--seed", type=int, default=0)
    emulate.add_argument(
        "--start-time",
        type=_start_time,
        metavar="TIME",
        help="device time of the first message: seconds since the epoch or ISO 8601; one "
        "second apart after it (default: so that the last one is now); a fixed time makes "
        "a rerun send the very same messages",
    )
    emulate.add_argument(
        "--max-attempts",
        type=integer(0),
        default=DEFAULT_ATTEMPTS,
        help="give up on a batch the receiver keeps answering 5xx (or not at all) after "
        "this many tries, waiting up to 2 s between them; 0 = retry for ever, as flespi "
        "does (default: %(default)s). 401, 403, 404, 413, 429 or a refused connection "
        "stop at once",
    )


def run(args: argparse.Namespace) -> int:
    from flespi_receiver.emulator import DeliveryFailed

    try:
        return asyncio.run(_emulate(args))
    except DeliveryFailed as exc:
        raise CommandFailed(str(exc)) from None


async def _emulate(args: argparse.Namespace) -> int:
    from flespi_receiver.emulator import (
        EmulatorStats,
        StreamEmulator,
        encode_messages,
        sample_messages,
    )

    start_time = args.start_time
    if start_time is None:
        start_time = int(time.time()) - args.count
    messages = encode_messages(sample_messages(args.count, seed=args.seed, start_time=start_time))
    with progress_bar(len(messages), "msg", "emulate") as bar:

        def on_batch(new: int, stats: EmulatorStats) -> None:
            bar.update(new)
            bar.set_postfix_str(
                f"stored {stats.stored}, duplicates {stats.duplicates}, rejected {stats.rejected}"
            )

        emulator = StreamEmulator(
            args.url,
            authorization=args.authorization,
            gzip_level=6 if args.gzip else None,
            resend_rate=args.resend_rate,
            seed=args.seed,
            max_attempts=args.max_attempts or None,
            stop_on_refusal=True,
            on_batch=on_batch,
        )
        started = time.perf_counter()
        stats = await emulator.run(messages, args.batch_size)
        seconds = time.perf_counter() - started
    times = sorted(stats.reply_times) or [0.0]
    summary = {
        "messages": len(messages),
        # the receiver's own counts, from its replies
        "stored": stats.stored,
        "duplicates": stats.duplicates,
        "rejected": stats.rejected,
        "seconds": round(seconds, 3),
        "messages_per_second": round(len(messages) / seconds),
        "batches": stats.batches,
        "posts": stats.posts,
        "statuses": stats.statuses,
        "connection_errors": stats.connection_errors,
        "resent_acknowledged": stats.resent_acknowledged,
        "first_timestamp": start_time,
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
        "max_ms": round(times[-1] * 1000, 2),
    }
    print(orjson.dumps(summary, option=orjson.OPT_NON_STR_KEYS).decode())
    return EXIT_OK
