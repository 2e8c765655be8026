"""A stream posts batches; the table holds each message once and the reply says what happened."""

from __future__ import annotations

import gzip
import zlib
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest

from flespi_receiver.fields import as_datetime

from conftest import ClientFactory
from helpers import AUTH, count, flespi_message, streams_toml

TWO_STREAMS = streams_toml(
    ("main", "/flespi", "Bearer test-token"),
    ("backup", "/flespi/backup", "Basic YmFja3VwOnNlY3JldA=="),
)


async def test_batch_is_stored_with_payload_and_derived_columns(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    batch = [flespi_message(i) for i in range(3)]
    reply = await client.post("/flespi", data=orjson.dumps(batch), headers=AUTH)
    assert reply.status == 200
    assert await reply.json() == {"stored": 3, "duplicates": 0, "rejected": 0}
    stored = await db.fetch("SELECT * FROM messages ORDER BY device_id")
    assert [orjson.loads(row["payload"]) for row in stored] == batch
    first = stored[0]
    assert first["stream"] == "main"
    assert first["ident"] == "352625333200000"
    assert first["ts"] == datetime.fromtimestamp(1764000000.25, UTC)
    assert first["server_ts"] == datetime.fromtimestamp(1764000001.5, UTC)
    assert (first["channel_id"], first["device_id"]) == (1234, 500000)
    assert (first["latitude"], first["longitude"]) == (49.069782, 28.632826)
    assert first["received_at"] is not None


async def test_resent_batch_is_stored_once(receiver: ClientFactory, db: asyncpg.Connection) -> None:
    client = await receiver()
    batch = [flespi_message(i) for i in range(5)]
    await client.post("/flespi", data=orjson.dumps(batch), headers=AUTH)
    # flespi resends with other batch boundaries: overlap plus new messages
    again = batch[3:] + [flespi_message(i) for i in range(5, 7)]
    reply = await client.post("/flespi", data=orjson.dumps(again), headers=AUTH)
    assert await reply.json() == {"stored": 2, "duplicates": 2, "rejected": 0}
    assert await count(db) == 7


async def test_same_message_twice_in_one_batch_is_stored_once(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    reply = await client.post(
        "/flespi", data=orjson.dumps([flespi_message(1), flespi_message(1)]), headers=AUTH
    )
    assert await reply.json() == {"stored": 1, "duplicates": 1, "rejected": 0}
    assert await count(db) == 1


async def test_empty_batch_is_acknowledged(receiver: ClientFactory, db: asyncpg.Connection) -> None:
    client = await receiver()
    reply = await client.post("/flespi", data=b"[]", headers=AUTH)
    assert reply.status == 200
    assert await reply.json() == {"stored": 0, "duplicates": 0, "rejected": 0}
    assert await count(db) == 0


async def test_each_stream_has_its_path_and_credentials(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(streams=TWO_STREAMS)
    message = orjson.dumps([flespi_message(1)])
    assert (await client.post("/flespi", data=message, headers=AUTH)).status == 200
    backup = {"Authorization": "Basic YmFja3VwOnNlY3JldA=="}
    assert (await client.post("/flespi/backup", data=message, headers=AUTH)).status == 401
    assert (await client.post("/flespi/backup", data=message, headers=backup)).status == 200
    # the same message in two streams is two rows: identity is per stream
    assert await db.fetch("SELECT stream FROM messages ORDER BY stream") == [("backup",), ("main",)]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "bearer test-token"},
        {"Authorization": "Basic dGVzdC10b2tlbg=="},
    ],
    ids=["missing", "empty", "wrong", "wrong-case", "other-scheme"],
)
async def test_wrong_credentials_get_401_and_store_nothing(
    receiver: ClientFactory, db: asyncpg.Connection, headers: dict[str, str]
) -> None:
    client = await receiver()
    reply = await client.post("/flespi", data=orjson.dumps([flespi_message(1)]), headers=headers)
    assert reply.status == 401
    assert "Authorization" in (await reply.json())["error"]
    assert await count(db) == 0
    assert await count(db, "rejected_messages") == 0


async def test_both_rotation_tokens_are_accepted(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    for i, token in enumerate(("Bearer test-token", "Bearer next-token")):
        headers = {"Authorization": token}
        body = orjson.dumps([flespi_message(i)])
        assert (await client.post("/flespi", data=body, headers=headers)).status == 200
    assert await count(db) == 2


async def test_unauthenticated_body_is_not_read(receiver: ClientFactory) -> None:
    client = await receiver(extra="max_body_size = 1024")
    # a declared body far over the cap: 401 comes first, before any size check or read
    reply = await client.post("/flespi", data=b"[" + b" " * 100_000 + b"]")
    assert reply.status == 401


async def test_body_over_the_cap_gets_413(receiver: ClientFactory, db: asyncpg.Connection) -> None:
    client = await receiver(extra="max_body_size = 2048")
    big = orjson.dumps([flespi_message(i) for i in range(20)])
    assert len(big) > 2048
    reply = await client.post("/flespi", data=big, headers=AUTH)
    assert reply.status == 413

    async def chunks():  # no Content-Length: the cap applies while reading
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    reply = await client.post("/flespi", data=chunks(), headers=AUTH)
    assert reply.status == 413
    assert await count(db) == 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_are_accepted(
    receiver: ClientFactory, db: asyncpg.Connection, encoding: str
) -> None:
    client = await receiver()
    body = orjson.dumps([flespi_message(i) for i in range(10)])
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    headers = {**AUTH, "Content-Encoding": encoding}
    reply = await client.post("/flespi", data=packed, headers=headers)
    assert reply.status == 200
    assert await count(db) == 10


@pytest.mark.parametrize("size", [100, 200_000], ids=["small", "large"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_body_that_does_not_decompress_gets_400(
    receiver: ClientFactory, db: asyncpg.Connection, encoding: str, size: int
) -> None:
    client = await receiver()
    garbage = b"\x1f\x8b\x08\x00" + b"not compressed" * (size // 14)
    headers = {**AUTH, "Content-Encoding": encoding}
    reply = await client.post("/flespi", data=garbage, headers=headers)
    assert reply.status == 400
    assert (await reply.json())["error"].startswith("body incomplete or undecodable")
    assert reply.headers["Connection"] == "close"
    assert await count(db) + await count(db, "rejected_messages") == 0


async def test_gzip_bomb_gets_413_without_storing(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver(extra="max_body_size = 1048576")
    bomb = gzip.compress(b"[" + b" " * 200_000_000 + b"]")  # 200 MB of JSON in ~200 KB
    reply = await client.post("/flespi", data=bomb, headers={**AUTH, "Content-Encoding": "gzip"})
    assert reply.status == 413
    assert await count(db) == 0


async def test_unknown_encoding_gets_415(receiver: ClientFactory) -> None:
    client = await receiver()
    reply = await client.post(
        "/flespi", data=b"[]", headers={**AUTH, "Content-Encoding": "compress"}
    )
    assert reply.status == 415
    assert "'compress' is not supported" in (await reply.json())["error"]


async def test_unknown_path_and_wrong_method(receiver: ClientFactory) -> None:
    client = await receiver()
    missing = await client.post("/elsewhere", data=b"[]", headers=AUTH)
    assert missing.status == 404
    assert "error" in await missing.json()
    wrong = await client.get("/flespi", headers=AUTH)
    assert wrong.status == 405
    assert wrong.headers["Allow"] == "POST"


async def test_large_resent_batch_with_new_messages(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    first = [flespi_message(i) for i in range(200)]
    await client.post("/flespi", data=orjson.dumps(first), headers=AUTH)
    again = first[100:] + [flespi_message(i) for i in range(200, 300)] + [first[150]]
    reply = await client.post("/flespi", data=orjson.dumps(again), headers=AUTH)
    assert await reply.json() == {"stored": 100, "duplicates": 101, "rejected": 0}
    assert await count(db) == 300
    # ids follow the order in which messages arrived
    order = await db.fetch("SELECT device_id FROM messages ORDER BY id")
    assert [r["device_id"] for r in order] == [500000 + i for i in range(300)]


async def test_partition_time_comes_from_the_message_alone(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    batch = [
        {"ident": "a", "timestamp": 1764000000, "server.timestamp": 1764000009},
        {"ident": "b", "server.timestamp": 1764000009},
        {"ident": "c", "timestamp": "garbage"},
    ]
    await client.post("/flespi", data=orjson.dumps(batch), headers=AUTH)
    times = await db.fetch("SELECT ident, partition_ts FROM messages ORDER BY ident")
    assert [(r["ident"], r["partition_ts"].timestamp()) for r in times] == [
        ("a", 1764000000),
        ("b", 1764000009),
        ("c", datetime(2000, 1, 1, tzinfo=UTC).timestamp()),
    ]


async def test_both_write_paths_store_the_same_instants(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # times whose microseconds sit on a rounding edge; the message comes once in a large
    # batch (COPY) and once alone (INSERT): it must be recognised as the same both ways
    edgy = [{"ident": f"e{i}", "timestamp": 1764000000 + i + 0.0000005} for i in range(3)]
    filler = [flespi_message(i) for i in range(80)]
    client = await receiver()
    await client.post("/flespi", data=orjson.dumps(filler + edgy[:2]), headers=AUTH)
    for message in edgy:
        reply = await client.post("/flespi", data=orjson.dumps([message]), headers=AUTH)
        assert (await reply.json())["stored"] == (1 if message is edgy[2] else 0)
    big_again = await client.post("/flespi", data=orjson.dumps(filler + edgy), headers=AUTH)
    assert (await big_again.json())["duplicates"] == 83
    times = await db.fetch("SELECT ts, partition_ts FROM messages WHERE ident LIKE 'e%'")
    assert all(r["ts"] == r["partition_ts"] for r in times)
    assert await count(db) == 83


async def test_a_message_with_every_column_stores_the_same_instants_both_ways(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # both times on a rounding edge of a microsecond, every derived column set: the message
    # comes in a large batch (COPY) and then alone (INSERT), which must find it stored
    edgy = [
        flespi_message(1000 + i, timestamp=1764000000 + i + 0.0000005, **{"server.timestamp": t})
        for i, t in enumerate([1764000000.0000015, 1764000001.2500005, 1.0000005])
    ]
    filler = [flespi_message(i) for i in range(80)]
    client = await receiver()
    reply = await client.post("/flespi", data=orjson.dumps(edgy + filler), headers=AUTH)
    assert (await reply.json())["stored"] == 83
    for message in edgy:
        reply = await client.post("/flespi", data=orjson.dumps([message]), headers=AUTH)
        assert await reply.json() == {"stored": 0, "duplicates": 1, "rejected": 0}
    stored = await db.fetch(
        "SELECT ts, server_ts, partition_ts FROM messages WHERE ident = ANY($1) ORDER BY ident",
        [m["ident"] for m in edgy],
    )
    expected = [(as_datetime(m["timestamp"]), as_datetime(m["server.timestamp"])) for m in edgy]
    assert [(r["ts"], r["server_ts"]) for r in stored] == expected
    assert all(r["partition_ts"] == r["ts"] for r in stored)
