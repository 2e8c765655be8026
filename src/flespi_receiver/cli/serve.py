"""`flespi-receiver serve`: migrate, then serve the stream endpoints until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command, load
from flespi_receiver.config import Settings
from flespi_receiver.database import apply_migrations, database_url
from flespi_receiver.server import serve_app


def register(commands: Subcommands) -> None:
    add_command(
        commands, "serve", "apply pending schema migrations, then serve the stream endpoints", run
    )


async def serve(settings: Settings, dsn: str, config: Path) -> None:
    """Migrate, then serve until SIGTERM or SIGINT."""
    await apply_migrations(settings, dsn)
    await serve_app(settings, dsn, config)


def run(args: argparse.Namespace) -> int:
    settings, config = load(args)
    with database_url(settings) as dsn:
        asyncio.run(serve(settings, dsn, config))
    return EXIT_OK
