"""The known fields of a message as column values: best effort, never an error.

KnownFields, a pydantic TypedDict, is the one place that says which fields the receiver reads,
their types and ranges. A value that does not fit its column gives None (NULL); the message
keeps it in payload.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import ConfigDict, Field, GetCoreSchemaHandler, Strict, TypeAdapter, with_config
from pydantic_core import core_schema
from typing_extensions import TypedDict

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
MAX_IDENT_CHARACTERS = 512
# the largest integer every smaller one of which a double holds exactly
_EXACT_FLOAT = 2**53


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


class _NullIfInvalid:
    """A value that fails its type or range is None (NULL in its column), never an error."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_default_schema(handler(source), default=None, on_error="default")


# a number of seconds since the Unix epoch, in 1900 .. 9999 (absurd for a device clock outside)
_Epoch = Annotated[float, Strict(), Field(ge=_MIN_EPOCH, le=_MAX_EPOCH, allow_inf_nan=False)]
# a bigint: an integer that fits 64 bits, or a float with no fraction that is exactly an
# integer (|x| <= 2**53; an integer of the text past 64 bits arrives as a rounded float)
_Bigint = (
    Annotated[int, Strict(), Field(ge=-_INT64, lt=_INT64)]
    | Annotated[float, Strict(), Field(ge=-_EXACT_FLOAT, le=_EXACT_FLOAT, multiple_of=1.0)]
)
# a string as is, an integer as its digits; a float only when it is an integer too big for
# orjson's 64 bits, whose digits are then read from the text (columns)
# (a string of up to 512 characters: at most 2 KB in UTF-8, within PostgreSQL's limit for a
# btree index entry, about 2.7 KB, as the ident indexes take it)
_Ident = (
    Annotated[str, Strict(), Field(max_length=MAX_IDENT_CHARACTERS)]
    | Annotated[int, Strict()]
    | Annotated[float, Strict()]
)


_Latitude = Annotated[float, Strict(), Field(ge=-90.0, le=90.0, allow_inf_nan=False)]
_Longitude = Annotated[float, Strict(), Field(ge=-180.0, le=180.0, allow_inf_nan=False)]


# What the receiver understands: each derived column, the flespi parameter it comes from (in
# flespi's own dotted notation) and the type and range it takes. Anything else there is NULL
# (the message keeps it in payload); every other parameter is left to payload and the typed
# columns of messages_typed.
KNOWN_FIELDS: dict[str, tuple[str, Any]] = {
    "ident": ("ident", _Ident),
    "ts": ("timestamp", _Epoch),
    "server_ts": ("server.timestamp", _Epoch),
    "channel_id": ("channel.id", _Bigint),
    "device_id": ("device.id", _Bigint),
    "latitude": ("position.latitude", _Latitude),
    "longitude": ("position.longitude", _Longitude),
}
# the time fields: a batch with neither in any message gets every partition_ts = NO_TIME
TIME_FIELDS = ("ts", "server_ts")
NOTATIONS = ("dotted", "underscore", "pascal")


def names_in(notation: str, explicit: dict[str, str | None] | None = None) -> dict[str, str]:
    """The parameter name of each known field in a stream whose convert_message writes names
    in `notation` (dotted: position.latitude, underscore: position_latitude, pascal:
    PositionLatitude), `explicit` names winning."""
    names = {}
    for column, (dotted, _) in KNOWN_FIELDS.items():
        if notation == "underscore":
            name = dotted.replace(".", "_")
        elif notation == "pascal":
            name = "".join(part[:1].upper() + part[1:] for part in dotted.split("."))
        else:
            name = dotted
        names[column] = (explicit or {}).get(column) or name
    return names


# TypedDict called with names known only from the configuration
_typed_dict: Any = TypedDict


class MessageFields:
    """How one stream's messages are read: the known fields, by the names that stream uses (a
    pydantic TypedDict validator built once, used for every message), and whether the stream
    keys its messages by content rather than by their text (identity.py)."""

    def __init__(
        self, names: dict[str, str], *, content_identity: bool = False, keep_keys: bool = False
    ) -> None:
        self.names = names
        self.content_identity = content_identity
        # merge mode: each message keeps the digest of its keys (Message.keys_digest), so that
        # the fold reads again only the messages whose parameters differ from their device's
        # latest message's
        self.keep_keys = keep_keys
        known = _typed_dict(
            "KnownFields",
            {
                column: Annotated[kind | None, _NullIfInvalid(), Field(alias=names[column])]
                for column, (_, kind) in KNOWN_FIELDS.items()
            },
            total=False,
        )
        self._validator: TypeAdapter[dict[str, Any]] = TypeAdapter(
            with_config(ConfigDict(extra="ignore"))(known)
        )
        # pydantic-core's validator itself: TypeAdapter.validate_python's own Python frame cost
        # 0.9 of the 2.9 ms that 1000 messages take
        self._validate = self._validator.validator.validate_python
        # the keys a large element is read for (large_element.py); a stream keyed by content
        # needs each message parsed whole
        self.large_names: tuple[str, ...] | None = (
            None if content_identity else tuple(names.values())
        )
        # set when a message had a time field; see store_batch
        self.time_seen = False
        self.warned_without_time = False

    def columns(self, data: dict[str, Any], raw: bytes) -> tuple[Any, ...]:
        """The derived columns of a message, in the order of MESSAGE_COLUMNS without stream,
        payload and message_hash: ident, ts, server_ts, channel_id, device_id, latitude,
        longitude, and last partition_ts (ts, else server_ts, else NO_TIME)."""
        known: dict[str, Any] = self._validate(data)
        ident = known["ident"]
        if ident is not None and type(ident) is not str:
            ident = (
                str(ident)
                if type(ident) is int
                else integer_digits(top_level_value(raw, self.names["ident"]))
            )
        ts = known["ts"]
        server_ts = known["server_ts"]
        channel_id = known["channel_id"]
        device_id = known["device_id"]
        if ts is not None or server_ts is not None:
            self.time_seen = True
        return (
            ident,
            ts,
            server_ts,
            channel_id if type(channel_id) is not float else int(channel_id),
            device_id if type(device_id) is not float else int(device_id),
            known["latitude"],
            known["longitude"],
            ts if ts is not None else server_ts if server_ts is not None else NO_TIME,
        )


# flespi's own names, as a stream sends them unless convert_message renames them
DEFAULT_FIELDS = MessageFields(names_in("dotted"))
columns = DEFAULT_FIELDS.columns
