"""`flespi-receiver check-config`: validate the configuration, print it with secrets masked."""

from __future__ import annotations

import argparse

import orjson

from flespi_receiver.cli.common import EXIT_OK, Subcommands, add_command, load
from flespi_receiver.config import masked_view
from flespi_receiver.redact import REDACTOR


def register(commands: Subcommands) -> None:
    add_command(
        commands,
        "check-config",
        "validate the configuration and print it with secrets masked",
        run,
    )


def run(args: argparse.Namespace) -> int:
    settings, _ = load(args)
    # masked where the settings hold secrets, and wherever a secret appears again (a password
    # also written into another parameter of the URL)
    view = REDACTOR.clean(masked_view(settings))
    print(orjson.dumps(view, option=orjson.OPT_INDENT_2).decode())
    return EXIT_OK
