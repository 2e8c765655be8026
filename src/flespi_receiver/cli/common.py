"""What the commands share: the --config option, loading the settings, the exit codes."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import asyncpg
import structlog

from flespi_receiver.config import (
    Settings,
    config_path,
    load_settings,
    passwords_shown,
    secret_values,
)
from flespi_receiver.database import Database, connect, open_database
from flespi_receiver.errors import CommandFailed
from flespi_receiver.log import configure_logging
from flespi_receiver.redact import REDACTOR

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subcommands = argparse._SubParsersAction

log = structlog.get_logger("flespi_receiver.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


class Handler(Protocol):
    def __call__(self, args: argparse.Namespace) -> int: ...


def add_command(
    commands: Subcommands,
    name: str,
    text: str,
    handler: Handler,
    *,
    config: bool = True,
    passthrough: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand whose `handler(args)` runs it and returns the exit status.

    With `passthrough`, arguments the command does not know are kept, in order, in
    `args.passthrough` (for a program it runs) instead of being an error.
    """
    parser = commands.add_parser(name, help=text, description=text, allow_abbrev=False)
    if config:
        add_config_option(parser)
    parser.set_defaults(handler=handler)
    if passthrough:
        parser.set_defaults(passthrough=[])
    return parser


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML file (default: $FLESPI_RECEIVER_CONFIG, else ./config.toml)",
    )


def load(args: argparse.Namespace) -> tuple[Settings, Path]:
    """The settings named by --config (raises ConfigError), with logging set up from them."""
    path = config_path(args.config)
    settings = load_settings(path)
    configure_logging(settings.log)
    REDACTOR.add(secret_values(settings))
    if passwords_shown(settings):
        log.warning(
            "the database password is also part of a name the log shows (the database user "
            "or name, the schema, a stream's path...): it is masked in database URLs only, "
            "not in other text; choose a password that appears nowhere else"
        )
    return settings, path


T = TypeVar("T")


def with_connection(
    settings: Settings, work: Callable[[asyncpg.Connection, Database], Awaitable[T]]
) -> T:
    """Run `work` on one connection to the configured database (the embedded server: the
    running one, else started for the time it takes); the result of `work`."""

    async def run(database: Database) -> T:
        conn = await connect(settings, database.url)
        try:
            return await work(conn, database)
        except asyncpg.UndefinedTableError as exc:
            raise CommandFailed(
                f"{exc}: the schema {settings.database.schema_name!r} is not set up on this "
                "database; run flespi-receiver migrate (serve does it too)"
            ) from None
        finally:
            await conn.close()

    with open_database(settings) as database:
        return asyncio.run(run(database))
