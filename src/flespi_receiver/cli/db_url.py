"""`flespi-receiver db-url`: print the libpq URL of the configured database, password included."""

from __future__ import annotations

import argparse

from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command, load
from flespi_receiver.database import running_database_url


def register(commands: Subcommands) -> None:
    add_command(
        commands,
        "db-url",
        "print the configured database's URL (with the password: for psql, scripts, tools); "
        "the embedded server must be running (make run)",
        run,
    )


def run(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    print(running_database_url(settings))
    return EXIT_OK
