"""`flespi-receiver gaps`: stretches of time a stream is missing, with the backfill for each."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from flespi_receiver.cli.arguments import positive_number
from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command, load, with_connection
from flespi_receiver.database import Database
from flespi_receiver.errors import ConfigError
from flespi_receiver.gaps import Gap, find_gaps
from flespi_receiver.times import TimeFormatError, duration, parse_duration


def register(commands: Subcommands) -> None:
    command = add_command(
        commands,
        "gaps",
        "show, per stream, stretches of device time with no message while devices report, "
        "and the backfill command for each",
        run,
    )
    command.add_argument("--stream", help="only this stream")
    command.add_argument(
        "--days",
        type=positive_number,
        default=30.0,
        help="look this many days back (default: %(default)s)",
    )
    command.add_argument(
        "--min-gap",
        type=_duration,
        default="1h",
        metavar="DURATION",
        help="shortest gap shown: 90s, 30m, 6h, 2d (default: %(default)s)",
    )
    command.add_argument("--json", action="store_true", help="one JSON object per gap")


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except TimeFormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    names = [s.name for s in settings.streams]
    if args.stream is not None and args.stream not in names:
        raise ConfigError(
            f"no stream named {args.stream!r} in the configuration ({', '.join(names)})"
        )

    # a look only: nothing is migrated or re-keyed (an unmigrated database is said so)
    async def work(conn: asyncpg.Connection, database: Database) -> list[Gap]:
        now = datetime.now(UTC)
        since = now - timedelta(days=args.days)
        return await find_gaps(conn, now=now, since=since, min_gap=args.min_gap, stream=args.stream)

    gaps = with_connection(settings, work)
    by_text = {s.name for s in settings.streams if s.identity == "text"}
    if args.json:
        for gap in gaps:
            print(orjson.dumps(_as_dict(gap)).decode())
        return EXIT_OK
    if not gaps:
        print(
            f"no gap of {duration(args.min_gap.total_seconds())} or more in the last "
            f"{args.days:g} days"
        )
    for gap in gaps:
        until = "now (still silent)" if gap.open else f"{gap.end:%Y-%m-%d %H:%M:%S}"
        print(
            f"{gap.stream}: {gap.start:%Y-%m-%d %H:%M:%S} .. {until} UTC, "
            f"{duration(gap.length.total_seconds())}, {gap.devices} devices reporting around it"
        )
        print(f"    {gap.backfill_command()}")
        if gap.stream in by_text:
            print(f'    (first set identity = "content" for {gap.stream}: docs/recovery.md)')
    return EXIT_OK


def _as_dict(gap: Gap) -> dict[str, object]:
    return {
        "stream": gap.stream,
        "from": gap.start.isoformat(),
        "to": None if gap.open else gap.end.isoformat(),
        "seconds": round(gap.length.total_seconds()),
        "devices": gap.devices,
        "backfill": gap.backfill_command(),
    }
