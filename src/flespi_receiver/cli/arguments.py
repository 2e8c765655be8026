"""argparse types that check a value's range, so a bad argument is a usage error (exit 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from urllib.parse import urlsplit

# PostgreSQL's bigint: the largest id rejected_messages can hold
BIGINT_MAX = 2**63 - 1


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An integer within minimum..maximum (inclusive)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            within = f"{minimum}..{maximum}" if maximum is not None else f"{minimum} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {within}")
        return value

    return parse


def share(text: str) -> float:
    """A share from 0 to 1, like 0.05."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: a share from 0 to 1, like 0.05")
    return value


def positive_number(text: str) -> float:
    """A number above 0, like 14 or 0.5."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text} is out of range: a number above 0, like 14")
    return value


def http_url(text: str) -> str:
    """An http:// or https:// URL with a host."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http(s) URL; like http://127.0.0.1:8080/flespi"
        )
    return text
