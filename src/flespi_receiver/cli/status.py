"""`flespi-receiver status`: per stream counts, the database, the schema version, the trigger."""

from __future__ import annotations

import argparse

import asyncpg
import orjson

from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command, load, with_connection
from flespi_receiver.database import Database
from flespi_receiver.status import Status, collect_status, render_status


def register(commands: Subcommands) -> None:
    status = add_command(
        commands,
        "status",
        "per stream: messages stored (all, last hour), last commit, rejected, devices; "
        "the database, its size, the schema version and whether the trigger is on",
        run,
    )
    status.add_argument("--json", action="store_true", help="one JSON object, for scripts")


def run(args: argparse.Namespace) -> int:
    settings, _ = load(args)

    async def collect(conn: asyncpg.Connection, database: Database) -> Status:
        return await collect_status(conn, settings, database.url)

    status = with_connection(settings, collect)
    if args.json:
        print(orjson.dumps(status.as_json()).decode())
    else:
        print(render_status(status))
    return EXIT_OK
