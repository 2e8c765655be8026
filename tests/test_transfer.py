"""Broken transfers and refused requests: the right code first, nothing kept, the log says so.

A compressed body that does not end properly is a broken transfer (400, Connection: close),
never content to quarantine; a refusal (credentials, size, coding) is the first reply, also
when the client waits for `100 Continue` before sending its body.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import zlib
from collections.abc import Callable

import asyncpg
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from flespi_receiver.body import _Decoder
from flespi_receiver.errors import BodyIncomplete
from flespi_receiver.ingest import STREAMED_BODY

from conftest import Client, ClientFactory
from helpers import AUTH, TOKEN, count, flespi_message, reply_on, send_partial_body

SMALL = orjson.dumps([{"ident": "a"}, {"ident": "b"}])
LARGE = orjson.dumps([flespi_message(i) for i in range(400)])


def raw_deflate(body: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)
    return packer.compress(body) + packer.flush()


def corrupt_crc(packed: bytes) -> bytes:
    return packed[:-8] + bytes([packed[-8] ^ 0xFF]) + packed[-7:]


# (name, Content-Encoding, body -> the bytes sent)
BROKEN: list[tuple[str, str, Callable[[bytes], bytes]]] = [
    ("gzip-minus-9-bytes", "gzip", lambda b: gzip.compress(b)[:-9]),
    ("gzip-half", "gzip", lambda b: gzip.compress(b)[: len(gzip.compress(b)) // 2]),
    ("gzip-last-byte-missing", "gzip", lambda b: gzip.compress(b)[:-1]),
    ("gzip-bad-checksum", "gzip", lambda b: corrupt_crc(gzip.compress(b))),
    ("gzip-trailing-garbage", "gzip", lambda b: gzip.compress(b) + b"garbage"),
    ("gzip-second-member-cut", "x-gzip", lambda b: gzip.compress(b) + gzip.compress(b)[:30]),
    ("gzip-not-gzip", "gzip", lambda b: b),
    ("gzip-empty", "gzip", lambda b: b""),
    ("zlib-half", "deflate", lambda b: zlib.compress(b)[: len(zlib.compress(b)) // 2]),
    ("zlib-bad-checksum", "deflate", lambda b: zlib.compress(b)[:-1] + b"\x00"),
    ("zlib-trailing-garbage", "deflate", lambda b: zlib.compress(b) + b"x"),
    ("raw-deflate-half", "deflate", lambda b: raw_deflate(b)[: len(raw_deflate(b)) // 2]),
]


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == {"stream": "main", **labels}:
                return sample.value
    return 0.0


async def metrics_text(client: Client) -> str:
    return await (await client.get("/metrics")).text()


@pytest.mark.parametrize(("coding", "damage"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
async def test_broken_compressed_body_gets_400_and_nothing_is_kept(
    receiver: ClientFactory,
    db: asyncpg.Connection,
    coding: str,
    damage: Callable[[bytes], bytes],
) -> None:
    # each also arriving in pieces of any size: test_every_broken_stream_is_seen_however_it_arrives
    client = await receiver()
    sent = damage(SMALL)
    headers = {**AUTH, "Content-Encoding": coding}
    with capture_logs() as logs:
        reply = await client.post("/flespi", data=sent, headers=headers)
        assert reply.status == 400
        assert (await reply.json())["error"].startswith("body incomplete or undecodable")
    assert reply.headers["Connection"] == "close"
    assert await count(db) == 0
    assert await count(db, "rejected_messages") == 0
    (line,) = [e for e in logs if e["event"] == "batch"]
    assert (line["status"], line["bytes"]) == (400, len(sent))
    assert metric(await metrics_text(client), "flespi_receiver_requests_total", status="400") == 1


async def test_a_large_compressed_body_is_cut_while_it_is_stored(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # large enough compressed to take the path that stores a body while it arrives
    body = orjson.dumps([flespi_message(i) for i in range(6000)])
    packed = gzip.compress(body)
    assert len(packed) > STREAMED_BODY
    client = await receiver()
    for sent in (packed[:-9], packed[: len(packed) // 2], corrupt_crc(packed)):
        reply = await client.post(
            "/flespi", data=sent, headers={**AUTH, "Content-Encoding": "gzip"}
        )
        assert (reply.status, reply.headers["Connection"]) == (400, "close")
    assert await count(db) + await count(db, "rejected_messages") == 0
    reply = await client.post("/flespi", data=packed, headers={**AUTH, "Content-Encoding": "gzip"})
    assert (reply.status, (await reply.json())["stored"]) == (200, 6000)


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "GZIP", "deflate", "identity", ""])
async def test_every_member_of_a_gzip_stream_is_read(
    receiver: ClientFactory, db: asyncpg.Connection, coding: str
) -> None:
    client = await receiver()
    a, b = orjson.dumps(flespi_message(1)), orjson.dumps(flespi_message(2))
    raw = b"[" + a + b"," + b + b"]"
    if coding.lower() in ("gzip", "x-gzip"):
        # one body in two gzip members, as concatenated files or a flushing writer produce
        sent = gzip.compress(raw[:40]) + gzip.compress(raw[40:])
    elif coding == "deflate":
        sent = raw_deflate(raw)  # raw deflate, as some clients send it, is read too
    else:
        sent = raw
    reply = await client.post("/flespi", data=sent, headers={**AUTH, "Content-Encoding": coding})
    assert (reply.status, await reply.json()) == (
        200,
        {"stored": 2, "duplicates": 0, "rejected": 0},
    )
    assert await count(db) == 2


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, gzip", "deflate, br"])
async def test_unsupported_coding_gets_415_in_json_after_authorization(
    receiver: ClientFactory, db: asyncpg.Connection, coding: str
) -> None:
    client = await receiver()
    headers = {"Content-Encoding": coding}
    with capture_logs() as logs:
        wrong = await client.post("/flespi", data=b"\x00\xff", headers=headers)
        assert (wrong.status, wrong.content_type) == (401, "application/json")
        refused = await client.post("/flespi", data=b"\x00\xff", headers={**AUTH, **headers})
        assert (refused.status, refused.content_type) == (415, "application/json")
    assert repr(coding) in (await refused.json())["error"]
    assert [e["status"] for e in logs if e["event"] == "batch"] == [401, 415]
    text = await metrics_text(client)
    assert metric(text, "flespi_receiver_requests_total", status="415") == 1
    assert await count(db) + await count(db, "rejected_messages") == 0


def headers_only(port: int, token: str, length: int) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(
        b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + token.encode() + b"\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n"
    )
    return raw


async def first_reply(raw: socket.socket) -> bytes:
    raw.settimeout(5)
    return await asyncio.to_thread(raw.recv, 4096)


@pytest.mark.parametrize(
    ("token", "length", "status"),
    [("Bearer wrong", 200_000, b"401"), (TOKEN, 10_000_000, b"413")],
    ids=["wrong-token", "oversized"],
)
async def test_expect_100_continue_gets_the_refusal_first(
    receiver: ClientFactory, db: asyncpg.Connection, token: str, length: int, status: bytes
) -> None:
    client = await receiver(extra="max_body_size = 1000000")
    raw = await asyncio.to_thread(headers_only, client.port, token, length)
    try:
        reply = await first_reply(raw)
    finally:
        raw.close()
    assert reply.startswith(b"HTTP/1.1 " + status), reply
    assert b"Connection: close" in reply
    assert await count(db) == 0


async def test_expect_100_continue_then_the_body_is_stored(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    raw = await asyncio.to_thread(headers_only, client.port, TOKEN, len(SMALL))
    try:
        assert (await first_reply(raw)).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        raw.sendall(SMALL)
        assert (await first_reply(raw)).startswith(b"HTTP/1.1 200")
    finally:
        raw.close()
    assert await count(db) == 2


async def test_a_slow_body_is_bound_by_body_timeout_not_command_timeout(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # a large body is stored while it arrives; the pause is longer than command_timeout, but
    # the time a body may take to arrive is body_timeout, whatever the database does meanwhile
    client = await receiver(extra="body_timeout = 10", database="command_timeout = 0.5")
    body = orjson.dumps([flespi_message(i) for i in range(200)])
    assert len(body) > STREAMED_BODY
    raw = await asyncio.to_thread(send_partial_body, client.port, len(body), body[:60_000])
    await asyncio.sleep(1.5)
    raw.sendall(body[60_000:])
    answer = await reply_on(raw)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert await count(db) == 200


def decode(coding: str, sent: bytes, step: int) -> bytes:
    """What the receiver's decoder makes of `sent` arriving `step` bytes at a time."""
    decoder, out = _Decoder(coding), []
    for start in range(0, len(sent), step):
        decoder.push(sent[start : start + step])
        while piece := decoder.pull():
            assert len(piece) <= 256 * 1024  # bounded, whatever the compression ratio
            out.append(piece)
    decoder.finish()
    return b"".join(out)


@pytest.mark.parametrize("step", [1, 13, 4096, 1 << 30])
def test_every_broken_stream_is_seen_however_it_arrives(step: int) -> None:
    body = LARGE if step > 1 else SMALL
    for coding, packed in [
        ("gzip", gzip.compress(body)),
        ("gzip", gzip.compress(body[:100]) + gzip.compress(body[100:])),
        ("deflate", zlib.compress(body)),
        ("deflate", raw_deflate(body)),
    ]:
        assert decode(coding, packed, step) == body
    for _, coding, damage in BROKEN:
        with pytest.raises(BodyIncomplete):
            decode(coding.lower(), damage(body), step)


def test_a_bomb_comes_out_a_bounded_piece_at_a_time() -> None:
    decoder = _Decoder("gzip")
    decoder.push(gzip.compress(b" " * 100_000_000))  # 100 MB from about 100 KB
    assert len(decoder.pull()) == 256 * 1024


async def test_a_large_body_meeting_a_lock_gets_503_after_command_timeout(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # a body stored while it arrives is not read while its COPY waits for the lock: the
    # database's wait is bound by command_timeout, not by body_timeout added to it
    client = await receiver(extra="body_timeout = 60", database="command_timeout = 0.5")
    body = orjson.dumps([flespi_message(i) for i in range(200)])
    assert len(body) > STREAMED_BODY
    async with db.transaction():
        await db.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        raw = await asyncio.to_thread(send_partial_body, client.port, len(body), body)
        answer = await asyncio.wait_for(reply_on(raw), 20)  # far below body_timeout
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"(lock_timeout)" in answer
    assert await count(db) == 0
    reply = await client.post("/flespi", data=body, headers=AUTH)
    assert (await reply.json())["stored"] == 200


async def test_a_client_gone_while_waiting_for_100_continue_is_a_400_not_a_bug(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # a reset (SO_LINGER 0) while the receiver writes 100 Continue
    client = await receiver()
    raw = socket.create_connection(("127.0.0.1", client.port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with capture_logs() as logs:
        raw.sendall(
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
            b"Expect: 100-continue\r\nContent-Length: 42\r\n\r\n"
        )
        raw.close()
        for _ in range(100):
            if any(e["event"] == "batch" for e in logs):
                break
            await asyncio.sleep(0.05)
    (line,) = [e for e in logs if e["event"] == "batch"]
    assert line["status"] == 400
    assert await count(db) == 0


async def test_a_slow_large_body_is_not_charged_to_the_server_statement_timeout(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    # the server's own statement_timeout is shorter than the body takes to arrive: the arrival
    # is not the database's work, and the body is stored
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE {name} SET statement_timeout = '500ms'")
    client = await receiver(extra="body_timeout = 10")
    body = orjson.dumps([flespi_message(i) for i in range(200)])
    raw = await asyncio.to_thread(send_partial_body, client.port, len(body), body[:60_000])
    await asyncio.sleep(1.5)
    raw.sendall(body[60_000:])
    answer = await reply_on(raw)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert await count(db) == 200


async def test_a_transfer_coding_other_than_chunked_gets_501_and_nothing_is_kept(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    packed = gzip.compress(SMALL)
    chunked = f"{len(packed):x}\r\n".encode() + packed + b"\r\n0\r\n\r\n"
    raw = socket.create_connection(("127.0.0.1", client.port))
    raw.sendall(
        b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked
    )
    answer = await reply_on(raw)
    assert answer.startswith(b"HTTP/1.1 501"), answer
    assert await count(db) == 0
    assert await count(db, "rejected_messages") == 0
