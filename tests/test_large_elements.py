"""A message of megabytes is judged without being parsed whole, with the verdicts of the usual
judge, is stored or quarantined like any other, and costs the receiver a few times its size."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flespi_receiver.fields import DEFAULT_FIELDS
from flespi_receiver.large_element import LARGE_ELEMENT, judge_large
from flespi_receiver.messages import Message, Rejected, judge_element

from conftest import STREAM_TOML
from helpers import (
    AUTH,
    count,
    memory_kib,
    receiver_of_its_own,
    reply_on,
    reset_peak,
    send_partial_body,
)

NAMES = DEFAULT_FIELDS.large_names or ()
KNOWN = {"ident": "dev-1", "timestamp": 1764000000.5, "position.latitude": 49.5}

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=10,
)


def _insert(text: bytes, extra: bytes) -> bytes:
    """`extra` (a `"key":value` member) as the first member of the outer object."""
    return b"{" + extra + (b"," if text != b"{}" else b"") + text[1:]


# ways to spell or to break a message's text, as a sender or an attacker might
DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda t: t,
    "spaced": lambda t: json.dumps(json.loads(t), ensure_ascii=False).encode(),
    "escaped": lambda t: json.dumps(json.loads(t)).replace("/", "\\/").encode(),
    "duplicate key": lambda t: _insert(t, b'"ident":1,"ident":2'),
    "duplicate escaped key": lambda t: _insert(t, b'"a":1,"\\u0061":2'),
    "spaced duplicate key": lambda t: _insert(t, b'"k" :1 , "k"\n:2'),
    "nested duplicate key": lambda t: _insert(t, b'"n":[{"x":1,"x":2}]'),
    "NUL escape": lambda t: _insert(t, b'"s":"a\\u0000"'),
    "escaped backslash then u0000": lambda t: _insert(t, b'"s":"a\\\\u0000"'),
    "invalid UTF-8": lambda t: _insert(t, b'"s":"\xc3\x28"'),
    "encoded surrogate": lambda t: _insert(t, b'"s":"\xed\xa0\x80"'),
    "lone surrogate escape": lambda t: _insert(t, b'"s":"\\udc00"'),
    "number beyond a double": lambda t: _insert(t, b'"n":-1.5E+400'),
    "309 digits": lambda t: _insert(t, b'"n":' + b"9" * 309),
    "exponent in a string": lambda t: _insert(t, b'"s":"1e999 and 9e400"'),
    "NaN": lambda t: _insert(t, b'"n":NaN'),
    "trailing comma": lambda t: t[:-1] + b",}" if t != b"{}" else b"{,}",
    "an array": lambda t: b"[" + t + b"]",
    "a string": lambda t: orjson.dumps(t.decode()),
    "a number": lambda t: b"12.5",
    "deep": lambda t: _insert(t, b'"d":' + b"[" * 1030 + b"]" * 1030),
    "deep but within the limit": lambda t: _insert(t, b'"d":' + b"[" * 1020 + b"]" * 1020),
    "very deep": lambda t: _insert(t, b'"d":' + b"[" * 5000 + b"]" * 5000),
    "number beyond a double by its digits": lambda t: _insert(t, b'"n":' + b"9" * 250 + b"e99"),
    "large exponent within a double": lambda t: _insert(t, b'"n":1e-300'),
    "quotes and brackets in strings": lambda t: _insert(t, b'"s":"\\"}]{[\\":\\\\"'),
}


@settings(max_examples=400, deadline=None)
@given(
    message=st.dictionaries(st.text(max_size=4), values, max_size=6),
    known=st.booleans(),
    damage=st.sampled_from(sorted(DAMAGE)),
)
def test_the_large_judge_gives_the_usual_verdicts(
    message: dict[str, Any], known: bool, damage: str
) -> None:
    if known:
        message = {**message, **KNOWN}
    raw = DAMAGE[damage](json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode())
    usual = judge_element(raw)
    large = judge_large(raw, NAMES)
    if isinstance(usual, Rejected):
        assert large == usual.reason, raw
    else:
        assert isinstance(large, dict), (raw, large)
        assert large == {name: usual.data[name] for name in NAMES if name in usual.data}


def test_only_large_elements_take_the_large_judge() -> None:
    big = orjson.dumps({**KNOWN, "s": "x" * LARGE_ELEMENT})
    judged = judge_element(big, NAMES)
    assert isinstance(judged, Message)
    assert judged.data == KNOWN  # the known keys only: the rest was never parsed
    small = orjson.dumps({**KNOWN, "s": "x"})
    assert judge_element(small, NAMES).data == orjson.loads(small)  # type: ignore[union-attr]


def _huge(**fields: Any) -> dict[str, Any]:
    return {**KNOWN, **fields}


async def test_large_messages_are_stored_with_their_columns_or_quarantined(
    receiver: Any, db: asyncpg.Connection
) -> None:
    client = await receiver()
    string = _huge(s="é" * LARGE_ELEMENT)
    array = _huge(ident="dev-2", a=list(range(300_000)))
    deep = _huge(ident="dev-3", d=[[["x" * LARGE_ELEMENT]]])
    nested_too_deep = b'{"ident":"dev-4","d":' + b"[" * 1000 + b"1" * 3 + b"]" * 1000 + b"}"
    duplicate = b'{"ident":"dup","s":"' + b"y" * LARGE_ELEMENT + b'","ident":"again"}'
    invalid = b'{"ident":"bad","s":"' + b"z" * LARGE_ELEMENT + b'\xff"}'
    elements = [orjson.dumps(string), orjson.dumps(array), orjson.dumps(deep)]
    body = b"[" + b",".join([*elements, nested_too_deep, duplicate, invalid]) + b"]"
    reply = await client.post("/flespi", data=io.BytesIO(body), headers=AUTH)
    assert reply.status == 200, await reply.text()
    assert await reply.json() == {"stored": 4, "duplicates": 0, "rejected": 2}
    rows = await db.fetch(
        "SELECT ident, ts, latitude, payload::text AS payload FROM messages ORDER BY id"
    )
    assert [row["ident"] for row in rows] == ["dev-1", "dev-2", "dev-3", "dev-4"]
    assert rows[0]["ts"].timestamp() == KNOWN["timestamp"]
    assert rows[0]["latitude"] == KNOWN["position.latitude"]
    assert orjson.loads(rows[0]["payload"]) == string
    assert orjson.loads(rows[1]["payload"]) == array
    assert orjson.loads(rows[2]["payload"]) == deep
    reasons = [r["reason"] for r in await db.fetch("SELECT reason FROM rejected_messages")]
    assert sorted(reasons) == [
        "duplicate key 'ident'",
        f"not valid UTF-8: byte 0xff at offset {len(invalid) - 3} of the message",
    ]
    # sent again: nothing stored twice
    again = await client.post("/flespi", data=io.BytesIO(body), headers=AUTH)
    assert await again.json() == {"stored": 0, "duplicates": 4, "rejected": 2}
    assert await count(db) == 4
    assert await count(db, "rejected_messages") == 2


BODY_SIZE = 4 * 1024 * 1024
SHAPES: dict[str, bytes] = {
    "one huge string": b'[{"ident":"s","s":"' + b"x" * BODY_SIZE + b'"}]',
    "one huge array of integers": b'[{"ident":"a","a":['
    + b",".join([b"1234567"] * (BODY_SIZE // 8))
    + b"]}]",
    "a huge element that is not an object": b'[["' + b"x" * BODY_SIZE + b'"]]',
    "not an array": b'{"s":"' + b"x" * BODY_SIZE + b'"}',
}


async def test_a_body_of_one_huge_message_costs_a_few_times_its_size(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    costs: dict[str, float] = {}
    async with receiver_of_its_own(tmp_path, database_url, 2 * BODY_SIZE) as (session, url, pid):
        for name, body in SHAPES.items():
            await asyncio.sleep(0.2)
            reset_peak(pid)
            before = memory_kib(pid, "VmRSS")
            async with session.post(url, data=io.BytesIO(body), headers=AUTH) as reply:
                assert reply.status == 200, (name, await reply.text())
            peak = memory_kib(pid, "VmHWM")
            costs[name] = (peak - before) * 1024 / len(body)
    assert await count(db) == 3
    assert await count(db, "rejected_messages") == 2
    # the body as received, the element's own bytes and what is sent on: about 3 x
    assert all(cost <= 4 for cost in costs.values()), costs


async def test_the_same_large_content_refused_twice_at_once_is_kept_once(
    receiver: Any, db: asyncpg.Connection
) -> None:
    client = await receiver(extra="bodies_in_flight = 9")  # room for three large bodies
    bad = b'[{"ident":"x","s":"' + b"q" * LARGE_ELEMENT + b'","ident":"y"}]'
    replies = await asyncio.gather(
        *(client.post("/flespi", data=io.BytesIO(bad), headers=AUTH) for _ in range(3))
    )
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert await count(db, "rejected_messages") == 1
    raw, reason = await db.fetchrow("SELECT raw, reason FROM rejected_messages")
    assert (raw, reason) == (bad[1:-1], "duplicate key 'ident'")


async def test_a_body_of_a_large_message_counts_as_several_bodies_in_flight(
    receiver: Any, db: asyncpg.Connection
) -> None:
    # a large message is held about three times: a body of 2 MiB needs three slots of 3 MiB
    client = await receiver(
        extra=f"bodies_in_flight = 3\nmax_body_size = {3 * 1024 * 1024}",
        database="acquire_timeout = 1",
    )
    ordinary = orjson.dumps([{"ident": f"d{i}", "n": "x" * 200} for i in range(400)])
    # one ordinary body in flight, half sent: one slot of three taken
    slow = await asyncio.to_thread(
        send_partial_body, client.port, len(ordinary), ordinary[: len(ordinary) // 2]
    )
    large = b'[{"ident":"big","s":"' + b"x" * (2 * LARGE_ELEMENT) + b'"}]'
    refused = await client.post("/flespi", data=io.BytesIO(large), headers=AUTH)
    assert refused.status == 503
    assert "needs more memory than one body in flight" in (await refused.json())["error"]
    assert refused.headers["Retry-After"] == "1"
    assert await count(db) == 0
    # the ordinary body ends; then there is room for the large one
    slow.sendall(ordinary[len(ordinary) // 2 :])
    assert (await reply_on(slow)).startswith(b"HTTP/1.1 200")
    stored = await client.post("/flespi", data=io.BytesIO(large), headers=AUTH)
    assert stored.status == 200, await stored.text()
    assert await count(db) == 401


async def test_large_bodies_sent_at_once_all_get_their_turn(
    receiver: Any, db: asyncpg.Connection
) -> None:
    # each counts as three bodies in flight of four: they take turns, none waits for another
    client = await receiver(database="acquire_timeout = 30")
    bodies = [b'[{"ident":"b%d","s":"' % i + b"x" * (2 * LARGE_ELEMENT) + b'"}]' for i in range(4)]
    replies = await asyncio.gather(
        *(client.post("/flespi", data=io.BytesIO(body), headers=AUTH) for body in bodies)
    )
    assert [reply.status for reply in replies] == [200] * 4
    assert await count(db) == 4


@pytest.mark.parametrize(
    "bad",
    [
        b'{"ident":"x","a":"\\ud83d"}',
        b'{"ident":"x","a":NaN}',
        b'{"ident":"x","a":' + b"[" * 1025 + b"]" * 1025 + b"}",
        b'{"ident":"x","a":' + b"[" * 1020 + b"1" + b"]" * 1020 + b"}",
    ],
    ids=["lone surrogate", "NaN", "nesting past the limit", "nesting within the limit"],
)
async def test_elements_msgspec_can_not_read_cost_only_themselves(
    receiver: Any, db: asyncpg.Connection, bad: bytes
) -> None:
    client = await receiver()
    good = [orjson.dumps({"ident": f"d{i}", "n": "x" * 200}) for i in range(400)]
    body = b"[" + b",".join([*good[:200], bad, *good[200:]]) + b"]"
    reply = await client.post("/flespi", data=io.BytesIO(body), headers=AUTH)
    assert reply.status == 200
    usual = judge_element(bad)
    rejected = 1 if isinstance(usual, Rejected) else 0
    assert await reply.json() == {"stored": 401 - rejected, "duplicates": 0, "rejected": rejected}
    assert await count(db) == 401 - rejected
    if rejected:
        assert await db.fetchval("SELECT reason FROM rejected_messages") == usual.reason


@pytest.mark.parametrize("where", [0, 5000, 99_999])
def test_an_object_of_many_keys_finds_a_key_given_twice(where: int) -> None:
    # past a few thousand keys an object's keys are kept as their places in the text
    keys = b",".join(b'"k%06d":%d' % (i, i) for i in range(100_000))
    whole = b'{"ident":"many",' + keys + b"}"
    assert judge_large(whole, NAMES) == {"ident": "many"}
    again = b'"k%06d"' % where
    escaped = b'"\\u006b' + again[2:]  # the same key, its k written as an escape
    for spelled in (again, escaped):
        raw = whole[:-1] + b"," + spelled + b":0}"
        assert judge_large(raw, NAMES) == f"duplicate key 'k{where:06d}'"
        usual = judge_element(raw)
        assert isinstance(usual, Rejected)
        assert usual.reason == f"duplicate key 'k{where:06d}'"


async def test_a_large_message_in_a_stream_keyed_by_content_is_one_however_spelled(
    receiver: Any, db: asyncpg.Connection
) -> None:
    client = await receiver(streams=STREAM_TOML + 'identity = "content"\n')
    message = {**KNOWN, "s": "é" * LARGE_ELEMENT, "n": [1.5, 2]}
    compact = orjson.dumps(message)
    spaced = json.dumps(message).encode()  # another spelling: escapes, spaces
    first = await client.post("/flespi", data=io.BytesIO(b"[" + compact + b"]"), headers=AUTH)
    assert await first.json() == {"stored": 1, "duplicates": 0, "rejected": 0}
    again = await client.post("/flespi", data=io.BytesIO(b"[" + spaced + b"]"), headers=AUTH)
    assert await again.json() == {"stored": 0, "duplicates": 1, "rejected": 0}
    assert await count(db) == 1
    assert await db.fetchval("SELECT ident FROM messages") == KNOWN["ident"]
