"""`flespi-receiver migrate`: apply pending schema migrations and exit (idempotent)."""

from __future__ import annotations

import argparse
import asyncio

from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command, load
from flespi_receiver.database import apply_migrations, open_database


def register(commands: Subcommands) -> None:
    add_command(commands, "migrate", "apply pending schema migrations and exit", run)


def run(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    with open_database(settings) as database:
        asyncio.run(apply_migrations(settings, database.url))
    return EXIT_OK
