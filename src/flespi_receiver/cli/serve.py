"""`flespi-receiver serve`: migrate, then serve the stream endpoints until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from flespi_receiver.allocator import keep_large_blocks_apart
from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command, load
from flespi_receiver.config import Settings
from flespi_receiver.database import Database, apply_migrations, open_database
from flespi_receiver.database_url import database_passwords
from flespi_receiver.redact import REDACTOR
from flespi_receiver.server import serve_app


def register(commands: Subcommands) -> None:
    add_command(
        commands, "serve", "apply pending schema migrations, then serve the stream endpoints", run
    )


async def serve(settings: Settings, database: Database, config: Path) -> None:
    """Migrate, then serve until SIGTERM or SIGINT.

    On the embedded server this process owns, a server that stops under it is started again;
    if that fails, serving ends with CommandFailed (the exit is non-zero).
    """
    await apply_migrations(settings, database.url)
    serving = asyncio.create_task(serve_app(settings, database.url, config))
    if database.embedded is None or not database.owned:
        await serving
        return
    watching = asyncio.create_task(database.embedded.watch())
    try:
        await asyncio.wait({serving, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watching, serving):
            task.cancel()
        outcomes = await asyncio.gather(watching, serving, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome


def run(args: argparse.Namespace) -> int:
    settings, config = load(args)
    keep_large_blocks_apart()  # the memory for bodies in flight stays what they hold
    with open_database(settings, exclusive=True) as database:
        if database.embedded is not None:  # the configured URL's are known already
            REDACTOR.add(database_passwords(database.url))
        asyncio.run(serve(settings, database, config))
    return EXIT_OK
