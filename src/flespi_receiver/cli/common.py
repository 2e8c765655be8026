"""What the commands share: the --config option, loading the settings, the exit codes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from flespi_receiver.config import Settings, config_path, load_settings
from flespi_receiver.log import configure_logging

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subcommands = argparse._SubParsersAction

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
    return settings, path
