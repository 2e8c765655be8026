"""`flespi-receiver backfill`: store device messages read from flespi's REST API."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from flespi_receiver.backfill import (
    MAX_PAGE_SIZE,
    PAGE_SIZE,
    BackfillRange,
    BackfillSummary,
    backfill,
    require_content_identity,
    require_keyed_by_content,
)
from flespi_receiver.cli.arguments import http_url, integer
from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command, load, with_connection
from flespi_receiver.database import Database, apply_migrations
from flespi_receiver.errors import ConfigError, UsageError
from flespi_receiver.flespi_api import DEFAULT_API_URL, FlespiApi
from flespi_receiver.progress import progress_bar
from flespi_receiver.redact import REDACTOR
from flespi_receiver.times import TimeFormatError, parse_time

TOKEN_ENV = "FLESPI_TOKEN"  # noqa: S105 (the name of the variable, not a token)


def register(commands: Subcommands) -> None:
    command = add_command(
        commands,
        "backfill",
        "read device messages from flespi's REST API and store those the stream missed",
        run,
    )
    command.add_argument("--stream", required=True, help="the [[streams]] name to store into")
    command.add_argument(
        "--devices",
        required=True,
        metavar="SELECTOR",
        help="flespi device selector: all, 123, 123,456, configuration.ident=...",
    )
    command.add_argument(
        "--from",
        dest="start",
        required=True,
        metavar="TIME",
        help="Unix seconds or ISO 8601 (inclusive)",
    )
    command.add_argument(
        "--to",
        dest="end",
        required=True,
        metavar="TIME",
        help="Unix seconds or ISO 8601 (inclusive)",
    )
    command.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the flespi token (default: ${TOKEN_ENV}); never on the command line",
    )
    command.add_argument(
        "--api-url", type=http_url, default=DEFAULT_API_URL, help="default: %(default)s"
    )
    command.add_argument(
        "--page-size",
        type=integer(1, MAX_PAGE_SIZE),
        default=PAGE_SIZE,
        help="messages per request and per transaction (default: %(default)s)",
    )
    command.add_argument(
        "--dry-run", action="store_true", help="fetch and count what would be stored; store nothing"
    )


def read_token(token_file: Path | None) -> str:
    """The flespi token from the file, else from $FLESPI_TOKEN; `FlespiToken ` is optional."""
    if token_file is not None:
        try:
            text = token_file.read_text()
        except OSError as exc:
            raise ConfigError(f"can't read the token file {token_file}: {exc.strerror}") from None
    else:
        text = os.environ.get(TOKEN_ENV, "")
    token = text.strip().removeprefix("FlespiToken").strip()
    if not token:
        where = f"the token file {token_file} is empty" if token_file else f"${TOKEN_ENV} is unset"
        raise ConfigError(
            f"no flespi token: {where}; put a token that may read the devices' messages in a "
            f"file given with --token-file, or in ${TOKEN_ENV}"
        )
    return token


def _time(text: str, option: str) -> datetime:
    """A --from/--to value; a usage error (exit 2) when it is not a time or before 1970."""
    try:
        value = parse_time(text)
    except TimeFormatError as exc:
        raise UsageError(f"{option}: {exc}") from None
    if value.timestamp() < 0:
        raise UsageError(f"{option}: {text!r} is before 1970, where flespi keeps nothing")
    return value


def run(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    named = [s for s in settings.streams if s.name == args.stream]
    if not named:
        names = ", ".join(s.name for s in settings.streams)
        raise ConfigError(f"no stream named {args.stream!r} in the configuration ({names})")
    stream = named[0]
    fields = stream.message_fields()
    require_content_identity(stream.name, fields)
    target = BackfillRange(
        args.stream, args.devices, _time(args.start, "--from"), _time(args.end, "--to")
    )
    if target.end < target.start:
        raise UsageError("--to is before --from")
    token = read_token(args.token_file)
    REDACTOR.add([token])  # whatever might quote it (an error, a log line) shows it masked

    async def work(conn: asyncpg.Connection, database: Database) -> BackfillSummary:
        with progress_bar(None, "devices", "backfill") as bar:

            def show(summary: BackfillSummary) -> None:
                bar.total = summary.devices
                bar.update(summary.devices_done + summary.position - bar.n)
                rate = summary.fetched / max(summary.elapsed(), 1e-9)
                bar.set_postfix_str(
                    f"pages {summary.pages}, messages {summary.fetched} "
                    f"(stored {summary.stored}), {rate:.0f} msg/s"
                )

            def retrying(reason: str, seconds: float) -> None:
                bar.write(f"flespi: {reason}; again in {seconds:.1f} s", file=sys.stderr)

            async with aiohttp.ClientSession() as session:
                api = FlespiApi(args.api_url, token, session, on_retry=retrying)
                # the token first, for the devices and their messages: a refused one changes
                # nothing in the database
                devices = await api.device_ids(args.devices)
                if devices:
                    moment = target.start.timestamp()
                    await api.device_messages(devices[0], moment, moment, 1)
                if args.dry_run:
                    # a dry run changes nothing: no migration, no re-keying
                    await require_keyed_by_content(conn, settings.database.schema_name, stream.name)
                else:
                    await apply_migrations(settings, database.url)
                return await backfill(
                    conn,
                    api,
                    target,
                    fields,
                    page_size=args.page_size,
                    dry_run=args.dry_run,
                    progress=show,
                )

    summary = with_connection(settings, work)
    print(orjson.dumps(summary.as_dict()).decode())
    return EXIT_OK
