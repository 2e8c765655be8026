"""What makes two messages one: their text by default, their content for a stream that asks."""

from __future__ import annotations

import hashlib

import asyncpg
import orjson
import pytest

from flespi_receiver.database import apply_migrations
from flespi_receiver.errors import ConfigError
from flespi_receiver.identity import canonical_identity, message_identity, text_identity
from flespi_receiver.identity_upgrade import apply_identities, streams_being_rekeyed

from conftest import STREAM_TOML, ClientFactory, SettingsFactory
from helpers import AUTH, count, flespi_message

CONTENT_STREAM = STREAM_TOML + 'identity = "content"\n'
SPELLINGS = [
    b'{"ident":"A","timestamp":1764000000.5,"speed":100,"w":100.0,"v":1.5,"name":"\xc3\xa9/x",'
    b'"n":[1,{"b":2,"a":1.0}]}',
    b'{ "timestamp" : 1764000000.50, "ident" : "A", "speed" : 100.0, "w" : 1e2, "v" : 1.50,'
    b' "name" : "\\u00e9\\/x", "n" : [ 1 , { "a" : 1, "b" : 2 } ] }',
    b'{"n":[1,{"a":1e0,"b":2}],"name":"\\u00E9/x","v":15e-1,"w":100,"speed":1.0E+2,"ident":"A",'
    b'"timestamp":1.7640000005e9}',
]


def identity(raw: bytes) -> bytes:
    return message_identity(orjson.loads(raw), raw)


def test_every_spelling_of_a_message_has_one_content_identity() -> None:
    assert len({identity(raw) for raw in SPELLINGS}) == 1
    assert len({text_identity(raw) for raw in SPELLINGS}) == 3


def test_the_fields_of_a_device_subscription_do_not_count() -> None:
    channel = flespi_message(1)
    for key in ("device.id", "device.name"):
        del channel[key]
    device = channel | {"device.id": 9, "device.name": "Truck", "device.type.id": 745}
    assert message_identity(channel, b"") == message_identity(device, b"")


def test_the_fields_of_a_device_subscription_do_not_count_whatever_their_type() -> None:
    channel = {"ident": "dv1", "timestamp": 1793900000, "x": 1}
    device = channel | {"device.id": 5.55e2, "device.type.id": 9.0, "device.name": None}
    assert message_identity(channel, b"") == message_identity(device, b"")


# numbers as a sender may write them, beside how PostgreSQL's jsonb writes them back
JSONB_SPELLINGS = [b"1e16", b"2.5e20", b"9007199254740993.0", b"1e19", b"-9.2e18", b"1.5e300"]


async def test_the_identity_of_the_stored_payload_is_that_of_the_text_received(
    db: asyncpg.Connection,
) -> None:
    # rows switched to content are re-keyed from payload: the same message must come back
    for number in JSONB_SPELLINGS:
        raw = b'{"ident":"n","v":' + number + b',"w":[' + number + b"]}"
        payload = await db.fetchval("SELECT $1::text::jsonb::text", raw.decode())
        assert canonical_identity(orjson.loads(payload)) == canonical_identity(orjson.loads(raw)), (
            raw,
            payload,
        )


@pytest.mark.parametrize(
    "change",
    [{"speed": 101}, {"v": 1.5000001}, {"name": "é/y"}, {"extra": None}, {"n": [1, {"a": 1}]}],
)
def test_any_other_difference_is_another_message(change: dict[str, object]) -> None:
    message = orjson.loads(SPELLINGS[0])
    assert message_identity(message, b"") != message_identity(message | change, b"")


def test_a_message_nested_deeper_than_a_canonical_form_keeps_the_identity_of_its_text() -> None:
    raw = b'{"a":' * 300 + b"1" + b"}" * 300
    assert canonical_identity(orjson.loads(raw)) is None
    assert message_identity(orjson.loads(raw), raw) == hashlib.sha256(raw).digest()[:16]


@pytest.mark.parametrize(("streams", "rows"), [(STREAM_TOML, 3), (CONTENT_STREAM, 1)])
async def test_a_respelled_message_is_one_only_for_a_stream_keyed_by_content(
    receiver: ClientFactory, db: asyncpg.Connection, streams: str, rows: int
) -> None:
    client = await receiver(streams=streams)
    for raw in SPELLINGS:
        reply = await client.post("/flespi", data=b"[" + raw + b"]", headers=AUTH)
        assert reply.status == 200
    assert await count(db) == rows
    hashes = {r[0] for r in await db.fetch("SELECT message_hash FROM messages")}
    expected = {identity(SPELLINGS[0])} if rows == 1 else {text_identity(r) for r in SPELLINGS}
    assert hashes == expected


async def test_a_stream_switched_to_content_has_its_rows_rekeyed_in_chunks(
    receiver: ClientFactory, db: asyncpg.Connection, make_settings: SettingsFactory
) -> None:
    # stored keyed by text: ten messages, one of them twice (once from a channel
    # subscription, without device.*), one with numbers spelled as exponents
    channel = {k: v for k, v in flespi_message(3).items() if not k.startswith("device.")}
    old = [orjson.dumps(flespi_message(i)) for i in range(9)]
    old += [SPELLINGS[2], orjson.dumps(channel)]
    text_receiver = await receiver()
    reply = await text_receiver.post("/flespi", data=b"[" + b",".join(old) + b"]", headers=AUTH)
    assert (await reply.json())["stored"] == 11
    other = await receiver(streams=STREAM_TOML.replace("main", "other").replace("flespi", "b"))
    reply = await other.post("/b", data=b"[" + old[0] + b"]", headers=AUTH)
    assert (await reply.json())["stored"] == 1

    await db.execute("INSERT INTO stream_identity (stream, identity) VALUES ('main', 'text')")
    seen: list[int] = []
    changed = await apply_identities(
        db, {"main": "content"}, chunk_rows=4, progress=lambda _, done, __: seen.append(done)
    )
    assert changed == 11
    assert seen == [4, 8, 11]
    assert await streams_being_rekeyed(db) == []
    rows = await db.fetch("SELECT id, payload::text FROM messages WHERE stream = 'main'")
    assert len(rows) == 10  # the later copy of message 3 is gone
    assert {r["id"] for r in rows} == set(range(1, 11))
    # device_state follows its messages to their new keys: every device still shows its latest
    states = await db.fetch(
        "SELECT s.payload, m.id FROM device_state s LEFT JOIN messages m ON m.stream = s.stream "
        "AND m.message_hash = s.message_hash WHERE s.stream = 'main'"
    )
    assert len(states) == len({m["ident"] for m in map(orjson.loads, old)})
    assert all(r["payload"] is not None and r["id"] is not None for r in states)
    for row in await db.fetch("SELECT stream, payload::text, message_hash FROM messages"):
        if row["stream"] == "main":
            assert row["message_hash"] == canonical_identity(orjson.loads(row["payload"]))
        else:  # another stream, still keyed by text: untouched
            assert row["message_hash"] == text_identity(old[0])

    # the stream, keyed by content now, finds each old message however flespi spells it again
    client = await receiver(streams=CONTENT_STREAM)
    for raw in (old[5], SPELLINGS[0], SPELLINGS[1]):
        reply = await client.post("/flespi", data=b"[" + raw + b"]", headers=AUTH)
        assert (await reply.json())["duplicates"] == 1
    assert await apply_identities(db, {"main": "content"}) == 0
    assert await count(db) == 11

    # back to text is refused: the rows' texts are not kept
    with pytest.raises(ConfigError, match="can't go back"):
        await apply_migrations(make_settings(), make_settings().database.url.get_secret_value())


async def test_migrate_rekeys_a_stream_switched_to_content(
    receiver: ClientFactory, db: asyncpg.Connection, make_settings: SettingsFactory
) -> None:
    client = await receiver()
    await client.post("/flespi", data=b"[" + SPELLINGS[1] + b"]", headers=AUTH)
    settings = make_settings(streams=CONTENT_STREAM)
    await apply_migrations(settings, settings.database.url.get_secret_value())
    assert await db.fetchval("SELECT message_hash FROM messages") == identity(SPELLINGS[0])
    state = await db.fetchrow("SELECT identity, next_id, finished_at FROM stream_identity")
    assert (state["identity"], state["next_id"]) == ("content", None)
    assert state["finished_at"] is not None
