"""A message's identity by content: the same for every spelling of the same message.

A stream's messages are keyed by their text as sent unless the stream sets
`identity = "content"` (config.StreamSettings); `flespi-receiver backfill` needs that, because
flespi spells one message differently depending on how it is read: the HTTP stream and the
REST API (`GET /gw/devices/{selector}/messages`) may order keys differently, escape strings
differently (`"\\u00e9"` or `"é"`, `"\\/"` or `"/"`) and write numbers differently (`1.50`,
`1.5`, `15e-1`; `100`, `100.0`, `1e2`). And a stream subscribed to devices adds the
`device.*` fields that a stream subscribed to channels lacks. The content identity is
computed from the parsed message, so that all of these are one message:

* keys sorted at every level, strings written one way (orjson's), a number written as the
  value it denotes: a double with no fraction (within -2**63 .. 2**64, the integers orjson
  reads) as the integer it equals, any other double shortest, so `100`, `100.0` and `1e2`
  are one value, and so are `1.5` and `15e-1`; the payload column (jsonb) gives the same
  identity back for rows stored before;
* `device.id`, `device.name` and `device.type.id` at the top level left out: flespi adds them
  to messages of registered devices (flespi.com/kb/messages-basic-information-units, "If a
  message is coming from the device, registered in flespi, additional messages fields are
  expected"), so they say which device the channel's message belongs to, nothing about the
  message itself.

What stays different: any other value (an integer written without a fraction is compared
exactly, a number with one as the double it parses to: 9007199254740993 and
9007199254740993.0, which is the double 9007199254740992, are two values), other keys (a
device plugin's fields), and messages nested deeper than orjson writes (254 levels),
whose identity is that of their text. Cost: a walk over the values and one more orjson
encoding per message than hashing the text (docs/performance.md), paid only by the streams
that choose it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import orjson

Identity = Literal["text", "content"]
IDENTITIES: tuple[Identity, ...] = ("text", "content")
# bytes in an identity, either kind: the first 16 of a SHA-256
IDENTITY_SIZE = 16

# the fields flespi adds to a channel's message when it belongs to a registered device
DEVICE_FIELDS = frozenset(("device.id", "device.name", "device.type.id"))
# the integers orjson reads as int (and writes): a double with no fraction in this range is
# written as the integer it equals, whatever text it came from (jsonb writes 1e16 back as
# 10000000000000000, which orjson reads as an int)
_MIN_INTEGER = -(2.0**63)
_MAX_INTEGER = 2.0**64


def text_identity(raw: bytes) -> bytes:
    """First 16 bytes of the SHA-256 of the text as sent: equal for a re-sent message."""
    return hashlib.sha256(raw).digest()[:IDENTITY_SIZE]


def message_identity(data: dict[str, Any], raw: bytes) -> bytes:
    """First 16 bytes of the SHA-256 of the message's canonical JSON (see the module); for a
    message nested deeper than orjson writes (254 levels), that of `raw`, its text as sent."""
    identity = canonical_identity(data)
    return identity if identity is not None else text_identity(raw)


def canonical_identity(data: dict[str, Any]) -> bytes | None:
    """The spelling-independent identity, or None for a message nested too deep for it."""
    try:
        return hashlib.sha256(orjson.dumps(_canonical(data, True))).digest()[:IDENTITY_SIZE]
    except (orjson.JSONEncodeError, RecursionError):
        return None


def _canonical(data: dict[str, Any], top: bool) -> dict[str, Any]:
    # keys sorted here (faster than orjson's OPT_SORT_KEYS), one loop, no call per scalar:
    # most values of a flespi message are flat numbers and strings
    canonical = {}
    for key in sorted(data):
        if top and key in DEVICE_FIELDS:
            continue
        value = data[key]
        kind = type(value)
        if kind is float:
            if value.is_integer() and _MIN_INTEGER <= value < _MAX_INTEGER:
                value = int(value)
        elif kind is dict:
            value = _canonical(value, False)
        elif kind is list:
            value = _canonical_list(value)
        canonical[key] = value
    return canonical


def _canonical_list(items: list[Any]) -> list[Any]:
    canonical = []
    for value in items:
        kind = type(value)
        if kind is float:
            if value.is_integer() and _MIN_INTEGER <= value < _MAX_INTEGER:
                value = int(value)
        elif kind is dict:
            value = _canonical(value, False)
        elif kind is list:
            value = _canonical_list(value)
        canonical.append(value)
    return canonical
