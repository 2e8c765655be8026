"""`flespi-receiver rejected replay`: store what now can be, from the quarantine."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import asyncpg
import orjson

from flespi_receiver.cli.common import (
    EXIT_OK,
    Subcommands,
    add_config_option,
    load,
    with_connection,
)
from flespi_receiver.database import Database
from flespi_receiver.errors import ConfigError
from flespi_receiver.progress import progress_bar
from flespi_receiver.replay import ReplaySelection, ReplaySummary, replay_rejected


def add_replay(
    commands: Subcommands, add_filter_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """The `replay` subcommand, with the same filters as `rejected list` (given by caller)."""
    text = (
        "run rejected rows through the stream's decoding and storing again: what now stores "
        "moves to messages, what still fails stays with its new reason"
    )
    parser = commands.add_parser("replay", help=text, description=text, allow_abbrev=False)
    add_config_option(parser)
    add_filter_options(parser)
    parser.add_argument(
        "--id", type=int, action="append", dest="ids", metavar="N", help="only this row; repeat"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="do it all, then roll back: says what would happen"
    )
    parser.set_defaults(handler=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    selection = ReplaySelection(
        stream=args.stream, ids=args.ids, reason=args.reason, since=args.since
    )

    fields = {s.name: s.message_fields() for s in settings.streams}
    if args.stream is not None and args.stream not in fields:
        # its field names and identity would be guessed: a message could be stored twice
        raise ConfigError(
            f"no stream named {args.stream!r} in the configuration ({', '.join(fields)}); "
            "replay with the configuration its receivers use"
        )

    async def work(conn: asyncpg.Connection, _: Database) -> ReplaySummary:
        with progress_bar(None, "rows", "replaying rejected_messages") as bar:

            def show(summary: ReplaySummary) -> None:
                bar.total = summary.selected
                bar.update(summary.examined - bar.n)

            return await replay_rejected(
                conn, selection, dry_run=args.dry_run, progress=show, fields=fields
            )

    summary = with_connection(settings, work)
    if summary.selected == 0:
        print("no rejected row matches", file=sys.stderr)
    if summary.not_configured:
        print(
            f"{summary.not_configured} rows of streams not in the configuration were left as "
            "they are",
            file=sys.stderr,
        )
    print(orjson.dumps(summary.as_dict()).decode())
    return EXIT_OK
