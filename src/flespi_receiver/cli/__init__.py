"""The `flespi-receiver` command line: one module per command in this package.

Each module has `register(commands)`, which adds its subcommand (and its options) with a
handler, and that handler is a thin layer over a module of the package that tests call
directly. Adding a command is adding a module and naming it in COMMANDS.
"""

from __future__ import annotations

import argparse
import sys

import asyncpg
import structlog

from flespi_receiver import __version__
from flespi_receiver.cli import (
    backfill,
    bench,
    check_config,
    db_url,
    emulate,
    gaps,
    migrate,
    psql,
    rejected,
    serve,
    status,
)
from flespi_receiver.cli.common import EXIT_FAILURE
from flespi_receiver.errors import ReceiverError
from flespi_receiver.redact import REDACTOR

log = structlog.get_logger("flespi_receiver.cli")

COMMANDS = (
    serve,
    migrate,
    check_config,
    status,
    gaps,
    rejected,
    backfill,
    db_url,
    psql,
    emulate,
    bench,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flespi-receiver",
        description="Receive flespi HTTP stream batches and store them in PostgreSQL exactly once.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors a user can cause end with a message and exit 1 or 2, no traceback."""
    parser = build_parser()
    # a command that passes arguments through (psql) gets those it does not know itself
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "passthrough"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.passthrough = [*args.passthrough, *extra]
    try:
        status: int = args.handler(args)
    except ReceiverError as exc:
        # a secret the command knows (a token, a password) is masked in what it says, too
        print(REDACTOR.redact(f"flespi-receiver {args.command}: {exc}"), file=sys.stderr)
        return exc.exit_code
    except (OSError, asyncpg.PostgresError) as exc:
        log.error("failed", error=f"{type(exc).__name__}: {exc}")
        if sys.stderr.isatty():  # else the `failed` line says it, and logs stay JSON lines
            message = f"flespi-receiver {args.command}: {type(exc).__name__}: {exc}"
            print(REDACTOR.redact(message), file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return status
