"""`flespi-receiver psql [ARGS...]`: psql on the configured database, ARGS passed through."""

from __future__ import annotations

import argparse
import os
import subprocess

from flespi_receiver.cli.common import Subcommands, add_command, load
from flespi_receiver.database import open_database
from flespi_receiver.psql import find_psql, psql_invocation


def register(commands: Subcommands) -> None:
    add_command(
        commands,
        "psql",
        "open psql on the configured database (the receiver's schema first on the search "
        "path); any other argument goes to psql as it is, e.g. -c 'SELECT 1'",
        run,
        passthrough=True,
    )


def run(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    extra = list(args.passthrough)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    with open_database(settings) as database:
        psql = find_psql(prefer_embedded=database.embedded is not None)
        call = psql_invocation(psql, database.url, settings.database.schema_name, extra)
        # psql owns the terminal until it exits; Ctrl-C goes to it (it cancels the query)
        return subprocess.call(call.argv, env={**os.environ, **call.env})
