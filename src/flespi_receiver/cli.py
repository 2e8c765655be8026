"""The `flespi-receiver` command: serve, migrate, check-config."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import orjson
import structlog

from flespi_receiver import __version__
from flespi_receiver.app import connection_settings
from flespi_receiver.columns import apply_columns
from flespi_receiver.config import Settings, config_path, load_settings, masked_view
from flespi_receiver.errors import ReceiverError
from flespi_receiver.log import configure_logging
from flespi_receiver.migrate import migrate
from flespi_receiver.partitions import ensure_partitioned, maintain
from flespi_receiver.server import serve_app
from flespi_receiver.tools import TOOL_COMMANDS, add_tool_commands, run_tool
from flespi_receiver.trigger import apply_trigger

log = structlog.get_logger("flespi_receiver.cli")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


@contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The configured URL, or an embedded PostgreSQL run for as long as the block lasts."""
    url = settings.database.url.get_secret_value()
    if url:
        yield url
        return
    from flespi_receiver.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.database.data_dir)
    log.info("starting embedded PostgreSQL", data_dir=str(server.data_dir))
    with server as embedded_url:
        yield embedded_url
    log.info("embedded PostgreSQL stopped")


async def apply_migrations(settings: Settings, dsn: str) -> None:
    conn = await asyncpg.connect(dsn, server_settings=connection_settings(settings))
    try:
        applied = await migrate(conn, settings.database.schema_name)
        await ensure_partitioned(conn, settings.partitioning)
        await maintain(conn, settings.partitioning)
        await apply_columns(conn, settings.columns)
        await apply_trigger(conn, settings.database)
    finally:
        await conn.close()
    log.info(
        "schema up to date",
        schema=settings.database.schema_name,
        applied=[f"{m.version:04d}_{m.name}" for m in applied],
    )


async def serve(settings: Settings, dsn: str, config: Path) -> None:
    """Migrate, then serve until SIGTERM or SIGINT."""
    await apply_migrations(settings, dsn)
    await serve_app(settings, dsn, config)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flespi-receiver",
        description="Receive flespi HTTP stream batches and store them in PostgreSQL exactly once.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "apply pending schema migrations, then serve the stream endpoints"),
        ("migrate", "apply pending schema migrations and exit"),
        ("check-config", "validate the configuration and print it with secrets masked"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "--config",
            metavar="PATH",
            help="TOML file (default: $FLESPI_RECEIVER_CONFIG, else ./config.toml)",
        )
    add_tool_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in TOOL_COMMANDS:
        return run_tool(args)
    config = config_path(args.config)
    try:
        settings = load_settings(config)
    except ReceiverError as exc:
        print(f"flespi-receiver: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log)
    if args.command == "check-config":
        print(orjson.dumps(masked_view(settings), option=orjson.OPT_INDENT_2).decode())
        return 0
    try:
        with database_url(settings) as dsn:
            if args.command == "migrate":
                asyncio.run(apply_migrations(settings, dsn))
            else:
                asyncio.run(serve(settings, dsn, config))
    except ReceiverError as exc:
        print(f"flespi-receiver: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, asyncpg.PostgresError) as exc:
        log.error("failed", error=f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE
    return 0
