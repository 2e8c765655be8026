"""Large bodies are stored while they arrive, with the same answers as whole ones."""

from __future__ import annotations

import asyncio
import gzip
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest.mock import patch

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flespi_receiver import splitter as splitter_module
from flespi_receiver.embedded import free_port
from flespi_receiver.ingest import STREAMED_BODY
from flespi_receiver.json_scan import split_array
from flespi_receiver.splitter import ElementSplitter, NotExact, split_elements

from conftest import Client, ClientFactory
from helpers import (
    AUTH,
    REJECT_STREAM,
    config_file,
    count,
    flespi_message,
    log_events,
    receiver_process,
    reply_on,
    send_partial_body,
    wait_until_serving,
)


def message(i: int) -> dict[str, Any]:
    # two beacons: "},{" inside a message too, where the splitter must not cut
    beacons = [{"ble.beacon.id": f"b{i}", "ble.rssi": -70}, {"ble.beacon.id": "c", "ble.rssi": -1}]
    return flespi_message(i, **{"ble.beacons": beacons, "note": "a },{ in a string"})


def large_batch(start: int = 0, size: int = 600) -> list[bytes]:
    return [orjson.dumps(message(i)) for i in range(start, start + size)]


def body_of(elements: list[bytes]) -> bytes:
    body = b"[" + b",".join(elements) + b"]"
    assert len(body) > STREAMED_BODY  # the streaming path, not the whole-body one
    return body


async def trickle(body: bytes, piece: int = 7000) -> AsyncIterator[bytes]:
    """The body in small writes with pauses, so that the receiver gets it in many chunks."""
    for start in range(0, len(body), piece):
        yield body[start : start + piece]
        await asyncio.sleep(0.001)


async def post(client: Client, body: bytes, trickled: bool = True) -> tuple[int, Any]:
    # with Content-Length the body is not sent chunked: the receiver knows it is large
    headers = {**AUTH, "Content-Length": str(len(body))}
    data = trickle(body) if trickled else body
    reply = await client.post("/flespi", data=data, headers=headers)
    return reply.status, await reply.json()


async def test_large_batch_arriving_in_pieces_is_stored_once(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    elements = large_batch()
    assert await post(client, body_of(elements)) == (
        200,
        {"stored": 600, "duplicates": 0, "rejected": 0},
    )
    stored = await db.fetch("SELECT payload::text AS p FROM messages ORDER BY id")
    assert [orjson.loads(r["p"]) for r in stored] == [orjson.loads(e) for e in elements]
    # re-sent, partly overlapping and split differently: only the new ones are stored
    again = body_of(large_batch(300, 600))
    assert await post(client, again) == (200, {"stored": 300, "duplicates": 300, "rejected": 0})
    assert await count(db) == 900


@pytest.mark.parametrize("position", [0, 299, 599], ids=["first", "middle", "last"])
async def test_bad_element_in_a_large_batch_arriving_in_pieces(
    receiver: ClientFactory, db: asyncpg.Connection, position: int
) -> None:
    client = await receiver()
    elements = large_batch()
    elements.insert(position, b'{"a": NaN}')
    assert await post(client, body_of(elements)) == (
        200,
        {"stored": 600, "duplicates": 0, "rejected": 1},
    )
    assert await db.fetchval("SELECT raw FROM rejected_messages") == b'{"a": NaN}'
    assert await count(db) == 600


async def test_reject_mode_refuses_a_large_batch_whole(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(streams=REJECT_STREAM)
    elements = large_batch()
    elements.insert(450, b'{"ident": "1", "ident": "2"}')
    status, reply = await post(client, body_of(elements))
    assert status == 422
    assert "duplicate key 'ident'" in reply["error"]
    assert await count(db) == 0
    assert await count(db, "rejected_messages") == 0


@pytest.mark.parametrize(
    "suffix",
    [b"", b"]]", b"] trailing", b',{"a":'],
    ids=["unterminated", "extra-bracket", "trailing-text", "cut-off"],
)
async def test_large_body_that_is_not_an_array_is_quarantined_whole(
    receiver: ClientFactory, db: asyncpg.Connection, suffix: bytes
) -> None:
    client = await receiver()
    body = body_of(large_batch())[:-1] + suffix
    assert await post(client, body) == (200, {"stored": 0, "duplicates": 0, "rejected": 1})
    assert await db.fetchval("SELECT raw FROM rejected_messages") == body
    assert await count(db) == 0


async def test_large_gzip_body_is_stored_and_a_large_bomb_refused(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(extra="max_body_size = 2000000")
    packed = gzip.compress(body_of(large_batch()))
    headers = {**AUTH, "Content-Encoding": "gzip"}
    reply = await client.post("/flespi", data=packed, headers=headers)
    assert (reply.status, (await reply.json())["stored"]) == (200, 600)
    # large when compressed too, and far over the cap when not: refused while it streams
    bomb = gzip.compress(body_of(large_batch(1000, 6000)) * 2)
    assert len(bomb) > STREAMED_BODY
    reply = await client.post("/flespi", data=bomb, headers=headers)
    assert reply.status == 413
    assert await count(db) == 600


async def test_slow_large_body_gets_408_and_frees_its_connection(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(extra="body_timeout = 1.5", database="pool_size = 1")
    body = body_of(large_batch())
    # a third of the body, then nothing: PostgreSQL is already copying the first messages...
    raw = await asyncio.to_thread(send_partial_body, client.port, len(body), body[: len(body) // 3])
    copying = await copy_in_progress(db)
    # ... and the COPY is abandoned when the body does not come
    answer = await reply_on(raw)
    assert copying
    assert answer.startswith(b"HTTP/1.1 408")
    assert await count(db) == 0
    # the only connection of the pool is free again
    assert (await post(client, body, trickled=False))[0] == 200
    assert await count(db) == 600


async def copy_in_progress(db: asyncpg.Connection) -> bool:
    for _ in range(50):
        if await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%messages%' "
            "AND state = 'active' AND pid <> pg_backend_pid()"
        ):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_abandoned_large_body_stores_nothing_and_the_stream_goes_on(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(database="pool_size = 1")
    body = body_of(large_batch())
    raw = await asyncio.to_thread(send_partial_body, client.port, len(body), body[: len(body) // 2])
    raw.close()
    await asyncio.sleep(0.3)
    assert await count(db) == 0
    assert (await post(client, body))[0] == 200
    assert await count(db) == 600


async def test_a_client_gone_mid_body_is_logged_not_blamed_on_the_database(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    body = body_of(large_batch())
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        raw = await asyncio.to_thread(send_partial_body, port, len(body), body[:20000])
        await asyncio.sleep(0.3)
        raw.close()
        await asyncio.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    events = log_events(config)
    assert not [e for e in events if e["event"] == "database unavailable"]
    (batch,) = [e for e in events if e["event"] == "batch"]
    assert batch["status"] == 400
    assert batch["reason"].startswith("body incomplete or undecodable")
    assert batch["bytes"] == 20000
    assert batch["client"] == "127.0.0.1"


# JSON values whose texts hold "},{" in strings and nested lists of objects
tricky_values = st.recursive(
    st.none()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text(alphabet='},{[]"\\ab ', max_size=6),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    elements=st.lists(
        st.dictionaries(st.text(max_size=3), tricky_values, max_size=3) | tricky_values,
        max_size=12,
    ),
    cut=st.integers(min_value=0, max_value=200),
    pieces=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8),
    damage=st.sampled_from([b"", b"]", b"x", b" ", b","]),
    piece=st.sampled_from([1, 7, splitter_module.PIECE]),
)
def test_splitting_as_the_body_arrives_finds_the_same_elements(
    elements: list[object], cut: int, pieces: list[int], damage: bytes, piece: int
) -> None:
    body = orjson.dumps(elements)
    # sometimes damaged somewhere: then both must refuse it, or both agree on the elements
    if damage:
        at = min(cut, len(body))
        body = body[:at] + damage + body[at:]
    whole = split_elements(body)
    splitter = ElementSplitter()
    # pieces of a few bytes: cut (and decoded in place) between almost every two elements
    size_of_pieces = {"PIECE": piece, "FIRST_PIECE": min(piece, splitter_module.FIRST_PIECE)}
    found: list[bytes] | None = []
    patched = patch.multiple(splitter_module, **size_of_pieces)
    patched.start()
    try:
        start, turn = 0, 0
        while start < len(body):
            size = pieces[turn % len(pieces)]
            found += [bytes(e) for e in splitter.feed(body[start : start + size])]
            start, turn = start + size, turn + 1
        found += [bytes(e) for e in splitter.finish()]
    except NotExact:
        found = None
    finally:
        patched.stop()
    if whole is not None:
        assert found == [bytes(e) for e in whole]
    else:
        # what msgspec can't read is split by its structure alone (as the careful path does),
        # so that each element is judged on its own; not an array at all: refused
        split = split_array(body)
        assert found == (None if isinstance(split, str) else split)


def test_an_element_msgspec_can_not_read_does_not_stop_the_cutting() -> None:
    # a NaN early in a body: the pieces after it are still cut and handed on as they arrive
    messages = [orjson.dumps({"ident": f"d{i}", "n": "x" * 100}) for i in range(3000)]
    messages[10] = b'{"ident":"bad","a":NaN}'
    body = b"[" + b",".join(messages) + b"]"
    splitter = ElementSplitter()
    while_arriving: list[bytes] = []
    for start in range(0, len(body), 4096):
        while_arriving += splitter.feed(body[start : start + 4096])
    at_the_end = splitter.finish()
    assert while_arriving + at_the_end == messages
    assert len(at_the_end) < 1000
