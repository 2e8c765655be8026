"""A batch folded per device while its rows are encoded: what device_state needs of it.

Most batches are folded here, in Python (a dict lookup and a tuple comparison per message,
overlapped with PostgreSQL's COPY). A batch of more than KEPT_DEVICES devices is folded by
PostgreSQL instead, from the batch's own rows (LATEST_OF_TRANSACTION): per device, the
receiver would keep about 350 bytes, more than a tiny message's own size, and the arrays sent
to keep_latest() as much again; in merge mode (MERGED_OF_TRANSACTION) every message is kept
until the end, so the limit is on messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from flespi_receiver.fields import POSTGRES_EPOCH, postgres_usecs
from flespi_receiver.identity import IDENTITY_SIZE
from flespi_receiver.messages import Message
from flespi_receiver.parameter_keys import parameter_keys

# state_order(): microseconds since 1900-01-01 UTC, plus one (0 is "no time")
_ORDER_OFFSET = (POSTGRES_EPOCH + 2208988800) * 1_000_000 + 1
_NO_TIME = "0" * 15
_LAST_ORDER = 16**15 - 1

# Past this many devices in one batch (merge mode: messages), PostgreSQL folds the batch's rows.
KEPT_DEVICES = 4096

# keep_latest()'s arrays from the rows this transaction stored in stream $1 (the index on
# xact_id finds them): per device the latest message by time (no time is the oldest), ties
# by identity, as DeviceFold.add; devices in the order of their idents' bytes, as sorted()
# in Python orders them (code points sort as their UTF-8 bytes do).
LATEST_OF_TRANSACTION = """
SELECT coalesce(array_agg(ident ORDER BY ident COLLATE "C"), '{}') AS idents,
       array_agg(ts ORDER BY ident COLLATE "C") AS times,
       array_agg(message_hash ORDER BY ident COLLATE "C") AS hashes,
       array_agg(partition_ts ORDER BY ident COLLATE "C") AS partition_times
FROM (SELECT DISTINCT ON (ident) ident, ts, message_hash, partition_ts
      FROM messages
      WHERE xact_id = pg_current_xact_id() AND stream = $1 AND ident IS NOT NULL
      ORDER BY ident, ts DESC NULLS LAST, message_hash DESC) AS latest
"""

# keep_merged()'s arrays from the rows of stream $1 that ROWS selects (in a fold made below,
# those this transaction stored), as DeviceFold.merged_arguments() makes them: per device its
# latest message, and for each parameter that message lacks the value and order of the latest
# earlier message that has it (the payload then is every parameter's last value, else NULL: the
# latest message's own), the earliest of those orders, the digest of the parameters' keys, and
# the last latitude and longitude with their orders.
_MERGED_FOLD = """
WITH batch AS (
    SELECT ident, ts, message_hash, partition_ts, payload, latitude, longitude,
           state_order(ts, message_hash) AS o
    FROM messages
    WHERE ROWS AND stream = $1 AND ident IS NOT NULL
), latest AS (
    SELECT DISTINCT ON (ident) ident, ts, message_hash, partition_ts, payload, o
    FROM batch ORDER BY ident, o DESC
), earlier AS (
    SELECT DISTINCT ON (b.ident, p.key) b.ident, p.key, p.value, b.o
    FROM batch AS b JOIN latest AS l ON l.ident = b.ident AND b.o < l.o,
         jsonb_each(b.payload) AS p(key, value)
    WHERE NOT l.payload ? p.key
    ORDER BY b.ident, p.key, b.o DESC
), folded AS (
    SELECT ident, jsonb_object_agg(key, value) AS payload, jsonb_object_agg(key, o) AS orders,
           min(o) AS oldest
    FROM earlier GROUP BY ident
), latitudes AS (
    SELECT DISTINCT ON (ident) ident, latitude, o FROM batch
    WHERE latitude IS NOT NULL ORDER BY ident, o DESC
), longitudes AS (
    SELECT DISTINCT ON (ident) ident, longitude, o FROM batch
    WHERE longitude IS NOT NULL ORDER BY ident, o DESC
)
SELECT coalesce(array_agg(l.ident ORDER BY l.ident COLLATE "C"), '{}') AS idents,
       array_agg(l.ts ORDER BY l.ident COLLATE "C") AS times,
       array_agg(l.message_hash ORDER BY l.ident COLLATE "C") AS hashes,
       array_agg(l.partition_ts ORDER BY l.ident COLLATE "C") AS partition_times,
       array_agg(coalesce(f.oldest, l.o) ORDER BY l.ident COLLATE "C") AS oldest,
       array_agg(l.payload || f.payload ORDER BY l.ident COLLATE "C") AS payloads,
       array_agg(coalesce(f.orders, '{}') ORDER BY l.ident COLLATE "C") AS orders,
       array_agg(parameter_keys(coalesce(l.payload || f.payload, l.payload))
                 ORDER BY l.ident COLLATE "C") AS keys,
       array_agg(a.latitude ORDER BY l.ident COLLATE "C") AS latitudes,
       array_agg(a.o ORDER BY l.ident COLLATE "C") AS latitude_orders,
       array_agg(g.longitude ORDER BY l.ident COLLATE "C") AS longitudes,
       array_agg(g.o ORDER BY l.ident COLLATE "C") AS longitude_orders
FROM latest AS l
LEFT JOIN folded AS f USING (ident)
LEFT JOIN latitudes AS a USING (ident)
LEFT JOIN longitudes AS g USING (ident)
"""
MERGED_OF_TRANSACTION = _MERGED_FOLD.replace("ROWS", "xact_id = pg_current_xact_id()")
# after device_state was off ($2: since when, NULL if unknown): each device's messages stored
# since then or since its state last changed, whichever is earlier (received_at is the storing
# transaction's start, updated_at the one that last changed the state, maybe a row inserted by
# hand after the trigger came back), all of them for a device without one; merged into its
# state, they make it what it would be (a message merged twice changes nothing)
MERGED_OF_MESSAGES = _MERGED_FOLD.replace(
    "ROWS",
    "received_at >= coalesce((SELECT least($2::timestamptz, d.updated_at) FROM device_latest AS d "
    "WHERE d.stream = $1 AND d.ident = messages.ident), '-infinity')",
)


def state_order(ts: float | None, identity: bytes) -> str:
    """The text state_order() gives in PostgreSQL: sorts like (ts or -infinity, identity)."""
    if ts is None:
        return _NO_TIME + identity.hex()
    usecs = min(max(postgres_usecs(ts) + _ORDER_OFFSET, 1), _LAST_ORDER)
    return f"{usecs:015x}{identity.hex()}"


# a message's place in "latest" order: its time as PostgreSQL stores it (microseconds: two
# times within one microsecond are one time there, so the tie goes by identity whatever the
# batching), no time older than any time, ties by identity
_Key = tuple[float, bytes]
_NEG_INF = float("-inf")


# numbers read as the text they were sent as (msgspec.Raw), integers of any size as Python's
_EXACT = msgspec.json.Decoder(float_hook=msgspec.Raw)


def exact_parameters(raw: bytes) -> dict[str, Any]:
    """A message's parameters with every number as it was sent: written back by json_column,
    a merged payload holds 12345678901234567890123, 0.1000000000000000055511151231257827 and
    1.50, where orjson would have read doubles (about 1.5 times orjson's time)."""
    parameters: dict[str, Any] = _EXACT.decode(raw)
    return parameters


def json_column(values: list[Any]) -> str | None:
    """One argument column as a JSON array; None (SQL NULL) when every value is None, which
    PostgreSQL reads as an empty array and unnest() pads with NULLs: the same rows, without
    reading a thousand nulls (partition times equal to the times, payloads that are the
    latest message's own: most often)."""
    if all(value is None for value in values):
        return None
    return msgspec.json.encode(values).decode()


@dataclass(slots=True)
class DeviceFold:
    """A batch folded per device, as messages are stored: the latest message of each device
    (and in merge mode every message, folded at the end), and the first and last message.

    `in_database`: the batch had more than KEPT_DEVICES devices (merge mode: messages), so
    `latest` (`every`) was let go and PostgreSQL folds the rows this transaction stored
    (LATEST_OF_TRANSACTION, MERGED_OF_TRANSACTION); a
    fold that holds messages stored before (the careful path) gets the same state that way,
    as folding those again changes nothing."""

    merge: bool
    latest: dict[str, tuple[_Key, float | None, bytes, float]] = field(default_factory=dict)
    every: dict[str, list[tuple[_Key, Message, float | None, float, Any, Any]]] = field(
        default_factory=dict
    )
    count: int = 0
    first: tuple[float, bytes] | None = None
    last: tuple[float, bytes] | None = None
    in_database: bool = False

    def add(self, message: Message, columns: Sequence[Any], identity: bytes) -> None:
        """One stored message with its derived columns (fields.columns()) and identity."""
        ident, ts, partition_ts = columns[0], columns[1], columns[7]
        self.count += 1
        self.last = (partition_ts, identity)
        if self.first is None:
            self.first = self.last
        if ident is None:
            return
        key = (_NEG_INF if ts is None else postgres_usecs(ts), identity)
        if self.merge:
            if self.in_database or self.count > KEPT_DEVICES:
                self.in_database, self.every = True, {}
                return
            entry = (key, message, ts, partition_ts, columns[5], columns[6])
            self.every.setdefault(ident, []).append(entry)
            return
        held = self.latest.get(ident)
        if held is None:
            if self.in_database:
                return
            if len(self.latest) >= KEPT_DEVICES:
                self.in_database, self.latest = True, {}
                return
            self.latest[ident] = (key, ts, identity, partition_ts)
        elif key > held[0]:
            self.latest[ident] = (key, ts, identity, partition_ts)

    def __bool__(self) -> bool:
        return self.count > 0

    @property
    def held_devices(self) -> int:
        """Devices the fold holds an entry for (0 once PostgreSQL folds the batch)."""
        return len(self.latest) + len(self.every)

    @property
    def devices(self) -> bool:
        """Whether the batch has a device whose state it keeps."""
        return bool(self.latest or self.every) or self.in_database

    def latest_arguments(self) -> list[Any]:
        """keep_latest()'s arguments, as device_state.KEEP_LATEST takes them: idents (sorted,
        so that receivers lock rows in one order) as a JSON array, times as a JSON array of
        microseconds since 2000-01-01 UTC (null: none), the identities side by side in one
        bytes (IDENTITY_SIZE each), partition times as the times (null where equal to the
        time: most often; NULL when all are). One text or bytes per column, not a list:
        asyncpg encodes an array parameter at about a microsecond an element."""
        idents = sorted(self.latest)
        rows = [self.latest[ident] for ident in idents]
        hashes = b"".join([row[2] for row in rows])
        assert len(hashes) == IDENTITY_SIZE * len(rows)
        return [
            json_column(idents),
            json_column([None if row[1] is None else postgres_usecs(row[1]) for row in rows]),
            hashes,
            json_column([None if row[1] == row[3] else postgres_usecs(row[3]) for row in rows]),
        ]

    def merged_arguments(self, with_payloads: bool = False) -> list[Any]:
        """keep_merged()'s arguments, as device_state.KEEP_MERGED takes them: per device its
        latest message, the earliest order among its parameters, the last value of every
        parameter with its order where it is not the latest message's, the digest of the
        parameters' keys, the last latitude and longitude with their orders. Unless
        `with_payloads`, the values are NULL where they are the latest message's own (most
        often): PostgreSQL reads them from that stored message if needed. Each column is one
        JSON array (times in microseconds since 2000-01-01 UTC, as latest_arguments), the
        identities and the digests side by side in one bytes each."""
        arrays: list[list[Any]] = [[] for _ in range(12)]
        for ident in sorted(self.every):
            entries = self.every[ident]
            entries.sort(key=lambda entry: entry[0])
            (_, newest), last, ts, partition_ts, _, _ = entries[-1]
            latest = state_order(ts, newest)
            last_data: dict[str, Any] | None = None
            last_keys = last.keys_digest
            if last_keys is None:
                last_data = exact_parameters(last.raw)
                last_keys = parameter_keys(tuple(last_data))
            values: dict[str, Any] = {}
            # the orders of the parameters that come from an earlier message of the batch
            orders: dict[str, str] = {}
            latitude = latitude_order = longitude = longitude_order = None
            for key, message, ts_, _, lat, lon in entries:
                order = state_order(ts_, key[1]) if message is not last else latest
                # an earlier message with the latest one's parameters gives none of its own
                # (most often): its text is read again only when they differ
                if message is not last and message.keys_digest != last_keys:
                    data = exact_parameters(message.raw)
                    values.update(data)
                    orders.update(dict.fromkeys(data, order))
                if lat is not None:
                    latitude, latitude_order = lat, order
                if lon is not None:
                    longitude, longitude_order = lon, order
            if orders or with_payloads:
                if last_data is None:
                    last_data = exact_parameters(last.raw)
                values.update(last_data)
                for name in last_data:
                    orders.pop(name, None)
            # the parameters are the latest message's unless an earlier one had others
            keys = parameter_keys(tuple(values)) if orders else last_keys
            row = (
                ident,
                None if ts is None else postgres_usecs(ts),
                newest,
                None if ts == partition_ts else postgres_usecs(partition_ts),
                min(orders.values(), default=latest),
                values if orders or with_payloads else None,
                orders,
                keys,
                latitude,
                latitude_order,
                longitude,
                longitude_order,
            )
            for array, value in zip(arrays, row, strict=True):
                array.append(value)
        # identities (IDENTITY_SIZE bytes) and digests (SHA-256, 32 bytes): one bytes each
        packed = {2: b"".join(arrays[2]), 7: b"".join(arrays[7])}
        return [
            packed[number] if number in packed else json_column(array)
            for number, array in enumerate(arrays)
        ]
