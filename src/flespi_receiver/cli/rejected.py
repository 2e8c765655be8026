"""`flespi-receiver rejected list|show|export|replay`: the quarantine (rejected_messages).

Each subcommand is a function here registered in SUBCOMMANDS; `add_filter_options` and
`filter_from` give a new one the same --stream/--since/--reason filters.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg
import orjson

from flespi_receiver.cli.arguments import BIGINT_MAX, integer
from flespi_receiver.cli.common import (
    EXIT_OK,
    Subcommands,
    add_config_option,
    load,
    with_connection,
)
from flespi_receiver.cli.rejected_replay import add_replay
from flespi_receiver.database import Database
from flespi_receiver.errors import CommandFailed, UsageError
from flespi_receiver.progress import progress_bar
from flespi_receiver.quarantine import (
    RejectedFilter,
    count_rejected,
    export_rejected,
    get_rejected,
    list_rejected,
    parse_since,
    readable,
)


def _since(text: str) -> datetime:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stream", help="only this stream (its name)")
    parser.add_argument(
        "--since",
        type=_since,
        metavar="TIME",
        help="received at or after TIME: 2026-11-01, 2026-11-01T10:00:00+02:00 (UTC when "
        "no offset), or back from now: 90m, 2h, 7d",
    )
    parser.add_argument("--reason", help="only reasons containing this text (any case)")


def filter_from(args: argparse.Namespace) -> RejectedFilter:
    return RejectedFilter(stream=args.stream, since=args.since, reason=args.reason)


def _list(commands: Subcommands) -> None:
    parser = _subcommand(commands, "list", "newest first: id, time, stream, size, reason, preview")
    add_filter_options(parser)
    parser.add_argument(
        "--limit", type=integer(1), default=50, help="rows at most, 1 or more (default: 50)"
    )
    parser.add_argument("--json", action="store_true", help="a JSON array, for scripts")
    parser.set_defaults(handler=run_list)


def _show(commands: Subcommands) -> None:
    parser = _subcommand(
        commands,
        "show",
        "one rejected row in full; raw as text when it is UTF-8, other bytes as \\xNN",
    )
    parser.add_argument("id", type=integer(1, BIGINT_MAX), help="the row's id (rejected list)")
    parser.add_argument(
        "--raw", action="store_true", help="write raw's exact bytes to stdout, nothing else"
    )
    parser.set_defaults(handler=run_show)


def _export(commands: Subcommands) -> None:
    parser = _subcommand(
        commands,
        "export",
        "JSON lines, oldest first: raw as base64 (exact) and as text where it is UTF-8",
    )
    add_filter_options(parser)
    parser.add_argument(
        "--output", type=Path, metavar="FILE", help="write to FILE (default: stdout)"
    )
    parser.set_defaults(handler=run_export)


def _replay(commands: Subcommands) -> None:
    add_replay(commands, add_filter_options)


SUBCOMMANDS: list[Callable[[Subcommands], None]] = [_list, _show, _export, _replay]


def register(commands: Subcommands) -> None:
    text = "read and replay the quarantine: content kept in rejected_messages"
    rejected = commands.add_parser("rejected", help=text, description=text)
    subcommands = rejected.add_subparsers(dest="rejected_command", required=True, metavar="ACTION")
    for add in SUBCOMMANDS:
        add(subcommands)


def _subcommand(commands: Subcommands, name: str, text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=text, description=text, allow_abbrev=False)
    add_config_option(parser)
    return parser


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("id", "received at (UTC)", "stream", "bytes", "reason", "content")
    lines = [header] + [
        (
            str(r["id"]),
            r["received_at"].strftime("%Y-%m-%d %H:%M:%S"),
            r["stream"],
            str(r["size"]),
            r["reason"],
            r["preview"],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)] + [line[-1]])
        for line in lines
    )


def run_list(args: argparse.Namespace) -> int:
    settings, _ = load(args)

    async def work(conn: asyncpg.Connection, _: Database) -> list[dict[str, Any]]:
        return await list_rejected(conn, filter_from(args), args.limit)

    rows = with_connection(settings, work)
    if args.json:
        print(orjson.dumps(rows).decode())
    elif rows:
        print(_table(rows))
    else:
        print("no rejected content matches", file=sys.stderr)
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    settings, _ = load(args)

    async def work(conn: asyncpg.Connection, _: Database) -> asyncpg.Record | None:
        return await get_rejected(conn, args.id)

    row = with_connection(settings, work)
    if row is None:
        raise CommandFailed(f"no rejected row with id {args.id}")
    raw = bytes(row["raw"])
    if args.raw:
        sys.stdout.buffer.write(raw)
        return EXIT_OK
    text, exact = readable(raw)
    print(f"id           {row['id']}")
    print(f"stream       {row['stream']}")
    print(f"received at  {row['received_at'].isoformat()}")
    print(f"reason       {row['reason']}")
    print(f"bytes        {len(raw)}")
    print(f"raw_hash     {bytes(row['raw_hash']).hex()}")
    if not exact:
        print("content      not shown exactly: bytes that are not UTF-8 and control characters")
        print("             appear as \\xNN (--raw writes the exact bytes)")
    print()
    print(text)
    return EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    where = filter_from(args)
    out: BinaryIO = sys.stdout.buffer
    if args.output:
        try:
            out = args.output.open("wb")
        except OSError as exc:
            raise UsageError(
                f"--output {args.output}: cannot be written ({exc.strerror}); give a file in "
                "an existing folder you can write to"
            ) from None

    async def work(conn: asyncpg.Connection, _: Database) -> int:
        total = await count_rejected(conn, where)
        written = 0
        try:
            with progress_bar(total, "rows", "exporting rejected_messages") as bar:
                async for record in export_rejected(conn, where):
                    out.write(orjson.dumps(record) + b"\n")
                    written += 1
                    bar.update(1)
        finally:
            if args.output:
                out.close()
            else:
                out.flush()
        return written

    written = with_connection(settings, work)
    if args.output:
        print(f"{written} rows written to {args.output}", file=sys.stderr)
    return EXIT_OK
