"""The known fields of a message as column values: best effort, never an error.

A value that does not fit its column gives None (NULL); the message keeps it in payload.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from flespi_receiver.json_scan import integer_digits, top_level_value

# The columns of messages a batch fills, in the order rows are written (id and received_at
# come from the database).
MESSAGE_COLUMNS = (
    "stream",
    "ident",
    "ts",
    "server_ts",
    "channel_id",
    "device_id",
    "latitude",
    "longitude",
    "payload",
    "message_hash",
    "partition_ts",
)
# partition_ts of a message with neither timestamp nor server.timestamp: 2000-01-01 UTC
NO_TIME = 946684800.0

# timestamps outside 1900-01-01 .. 9999-12-31 are absurd for a device clock
_MIN_EPOCH = -2208988800
_MAX_EPOCH = 253402300799
_INT64 = 2**63


def _number(value: Any) -> float | None:
    if type(value) is int or type(value) is float:
        return value
    return None


def text_of(value: Any) -> str | None:
    """A string as is, an integer as its digits; anything else has no text form."""
    if type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    return None


# 2000-01-01 UTC, where PostgreSQL counts its timestamps from, in Unix seconds
POSTGRES_EPOCH = 946684800
_POSTGRES_EPOCH_DATETIME = datetime(2000, 1, 1, tzinfo=UTC)


def postgres_usecs(seconds: float) -> int:
    """Unix seconds as PostgreSQL stores a timestamp: microseconds since 2000-01-01.

    The one conversion every path uses (COPY rows, INSERT parameters, lookups), so that one
    message always gets the very same partition_ts; rounded as PostgreSQL's to_timestamp()
    rounds.
    """
    return round((seconds - POSTGRES_EPOCH) * 1_000_000)


def as_datetime(seconds: float | None) -> datetime | None:
    """The same instant as postgres_usecs(), as a datetime asyncpg sends exactly."""
    if seconds is None:
        return None
    return _POSTGRES_EPOCH_DATETIME + timedelta(microseconds=postgres_usecs(seconds))


def epoch_seconds(value: Any) -> float | None:
    """Seconds since the Unix epoch, when they fall in 1900 .. 9999."""
    number = _number(value)
    if number is None or not _MIN_EPOCH <= number <= _MAX_EPOCH:
        return None
    return number


def bigint(value: Any) -> int | None:
    number = _number(value)
    if number is None or number != number or not -_INT64 <= number < _INT64:
        return None
    if type(number) is float and not number.is_integer():
        return None
    return int(number)


def coordinate(value: Any, limit: float) -> float | None:
    number = _number(value)
    if number is None or not -limit <= number <= limit:
        return None
    return float(number)


def ident_text(data: dict[str, Any], raw: bytes) -> str | None:
    """`ident` as text: a string as is, an integer as its digits, whatever its size (orjson
    reads an integer beyond 64 bits as a float: its digits are then taken from the text)."""
    value = data.get("ident")
    if type(value) is float:
        return integer_digits(top_level_value(raw, "ident"))
    return text_of(value)


def columns(data: dict[str, Any], raw: bytes) -> tuple[Any, ...]:
    """The derived columns of a message, in the order of MESSAGE_COLUMNS without stream,
    payload and message_hash: ident, ts, server_ts, channel_id, device_id, latitude,
    longitude, and last partition_ts (ts, else server_ts, else NO_TIME)."""
    get = data.get
    ts = epoch_seconds(get("timestamp"))
    server_ts = epoch_seconds(get("server.timestamp"))
    return (
        ident_text(data, raw),
        ts,
        server_ts,
        bigint(get("channel.id")),
        bigint(get("device.id")),
        coordinate(get("position.latitude"), 90.0),
        coordinate(get("position.longitude"), 180.0),
        ts if ts is not None else server_ts if server_ts is not None else NO_TIME,
    )
