"""A stranger costs nothing: refused bodies are not read, headers and idle connections are
bounded in bytes and time, and no header can change a reply. Real sockets, a real receiver."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from flespi_receiver.embedded import free_port

from helpers import (
    TOKEN,
    config_file,
    count,
    flespi_message,
    log_events,
    memory_kib,
    receiver_process,
    reset_peak,
    wait_until_serving,
)

BODY = orjson.dumps([flespi_message(1)])
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Served:
    port: int
    process: subprocess.Popen[bytes]
    config: Path

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime

    def memory_kib(self, field: str = "VmRSS") -> int:
        return memory_kib(self.process.pid, field)

    def reset_peak(self) -> None:
        reset_peak(self.process.pid)

    def connect(self) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port))
        raw.settimeout(10)
        return raw


@asynccontextmanager
async def serving(
    tmp_path: Path,
    database_url: str,
    server: str = "",
    acquire_timeout: float = 2,
    pool: int = 4,
    streams: str = "",
) -> AsyncIterator[Served]:
    """`flespi-receiver serve` in its own process, with `server` lines added to [server] and
    `streams` ([[streams]] tables) after the one stream of config_file."""
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    config.write_text(config.read_text() + streams)
    text = config.read_text().replace("[server]\n", f"[server]\n{server}\n", 1)
    database = f"acquire_timeout = {acquire_timeout}\npool_size = {pool}\n"
    config.write_text(text.replace("acquire_timeout = 2\n", database))
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        yield Served(port, process, config)


def read_reply(raw: socket.socket) -> bytes:
    """Everything the receiver sends until it closes the connection."""
    data = b""
    while chunk := raw.recv(65536):
        data += chunk
    return data


def read_until_reply(raw: socket.socket) -> bytes:
    """The first reply on a kept-alive connection (its headers and JSON body)."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = raw.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def endless_gzip(seconds: float) -> Iterator[bytes]:
    """Chunks of a gzip stream of zeros (about 1000:1) for `seconds`."""
    compressor = zlib.compressobj(wbits=31)
    zeros = bytes(1024 * 1024)
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        data = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
        yield f"{len(data):x}\r\n".encode() + data + b"\r\n"


def send_until_closed(raw: socket.socket, chunks: Iterator[bytes]) -> tuple[int, float]:
    """Send until the receiver closes the connection: (bytes sent, seconds it took)."""
    started, sent = time.monotonic(), 0
    try:
        for chunk in chunks:
            raw.sendall(chunk)
            sent += len(chunk)
    except OSError:  # reset or broken pipe: the receiver closed the connection
        return sent, time.monotonic() - started
    return sent, float("inf")


async def test_a_refused_gzip_stream_is_not_read_nor_inflated(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    async with serving(tmp_path, database_url) as served:
        raw = served.connect()
        raw.sendall(
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        cpu = served.cpu_seconds()
        sent, seconds = await asyncio.to_thread(send_until_closed, raw, endless_gzip(5))
        used = served.cpu_seconds() - cpu
        raw.close()
        # the receiver closed the connection at once instead of inflating gigabytes for 10 s
        assert seconds < 2, f"the stranger could send {sent} bytes for {seconds:.1f}s"
        assert used < 0.5, f"the refused stream cost {used:.2f}s of CPU"
        # the stream itself is not affected
        assert await store_one(served) == 200
    assert await count(db) == 1


async def store_one(served: Served) -> int:
    raw = served.connect()
    raw.sendall(
        b"POST /flespi HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
        + TOKEN.encode()
        + f"\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
        + BODY
    )
    try:
        return status_of(await asyncio.to_thread(read_reply, raw))
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"", 401),
        (
            b"Authorization: "
            + TOKEN.encode()
            + b"\r\nContent-Encoding: compress\r\nContent-Length: 1000000\r\n",
            415,
        ),
        (b"Authorization: " + TOKEN.encode() + b"\r\nContent-Length: 999999999\r\n", 413),
    ],
    ids=["401", "415", "413"],
)
async def test_a_refused_body_closes_the_connection_unread(
    tmp_path: Path, database_url: str, headers: bytes, status: int
) -> None:
    async with serving(tmp_path, database_url) as served:
        raw = served.connect()
        length = b"" if b"Content-Length" in headers else b"Content-Length: 999999999\r\n"
        raw.sendall(b"POST /flespi HTTP/1.1\r\nHost: x\r\n" + headers + length + b"\r\n")
        # the refusal comes on the headers alone, and the connection ends without waiting for
        # the body (sending it first would race the close: a reset can discard the reply)
        reply = await asyncio.to_thread(read_reply, raw)
        with contextlib.suppress(OSError):  # the receiver is gone: the body has nowhere to go
            raw.sendall(b"[" * 100_000)
        raw.close()
        assert status_of(reply) == status
        assert b"Connection: close" in reply


async def test_headers_beyond_the_size_limit_get_431_and_the_connection_closes(
    tmp_path: Path, database_url: str
) -> None:
    async with serving(tmp_path, database_url, "max_header_size = 4096") as served:
        raw = served.connect()
        raw.sendall(b"POST /flespi HTTP/1.1\r\nHost: x\r\n")
        for i in range(10):
            raw.sendall(f"X-Filler-{i}: {'a' * 500}\r\n".encode())
        reply = await asyncio.to_thread(read_reply, raw)
        raw.close()
        assert status_of(reply) == 431
        assert b"Server: flespi-receiver\r\n" in reply


@pytest.mark.parametrize(("lines", "status"), [(3, 408), (12, 431)])
async def test_a_request_sent_behind_another_gets_the_same_header_limits(
    tmp_path: Path, database_url: str, lines: int, status: int
) -> None:
    # pipelined: a complete request, then in the same packet the start of a next one that
    # never ends (under or over max_header_size)
    body = orjson.dumps([flespi_message(1)])
    settings = "max_header_size = 8192\nheader_timeout = 1"
    async with serving(tmp_path, database_url, settings) as served:
        raw = served.connect()
        first = (
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        raw.sendall(first + b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + filler * lines)
        replies = await asyncio.to_thread(read_reply, raw)  # until the receiver closes
        raw.close()
    assert replies.startswith(b"HTTP/1.1 200"), replies
    assert f"HTTP/1.1 {status} ".encode() in replies, replies
    assert replies.count(b"HTTP/1.1 ") == 2


async def test_headers_slower_than_the_time_limit_get_408_and_the_connection_closes(
    tmp_path: Path, database_url: str
) -> None:
    async with serving(tmp_path, database_url, "header_timeout = 1") as served:
        raw = served.connect()
        started = time.monotonic()
        raw.sendall(b"POST /flespi HTTP/1.1\r\nHost: x\r\n")
        reply = await asyncio.to_thread(read_reply, raw)
        raw.close()
        assert status_of(reply) == 408
        assert 0.9 < time.monotonic() - started < 3
        # a connection that never sends a byte is closed as well
        silent = served.connect()
        assert await asyncio.to_thread(read_reply, silent) != b""
        silent.close()


def batch_request(body: bytes = BODY, token: str = TOKEN) -> bytes:
    return (
        b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + token.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    tmp_path: Path, database_url: str
) -> None:
    async with serving(tmp_path, database_url, "keepalive_timeout = 1") as served:
        raw = served.connect()
        raw.sendall(batch_request())
        first = await asyncio.to_thread(read_until_reply, raw)
        assert status_of(first) == 200
        assert b"Connection: close" not in first  # a stream's sender keeps its connection
        started = time.monotonic()
        assert await asyncio.to_thread(raw.recv, 65536) == b""  # closed by the receiver
        assert 0.9 < time.monotonic() - started < 3
        raw.close()


async def test_only_a_stream_sender_keeps_its_connection_after_a_reply(
    tmp_path: Path, database_url: str
) -> None:
    async with serving(tmp_path, database_url) as served:
        # two batches on one connection: kept alive between them
        raw = served.connect()
        raw.sendall(batch_request())
        assert status_of(await asyncio.to_thread(read_until_reply, raw)) == 200
        raw.sendall(batch_request(orjson.dumps([flespi_message(2)])))
        assert status_of(await asyncio.to_thread(read_until_reply, raw)) == 200
        raw.close()
        # a chunked batch is stored, and the reply says the connection closes (it does)
        raw = served.connect()
        body = orjson.dumps([flespi_message(3)])
        raw.sendall(
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + f"{len(body):x}\r\n".encode()
            + body
            + b"\r\n0\r\n\r\n"
        )
        reply = await asyncio.to_thread(read_reply, raw)  # until the receiver closes
        raw.close()
        assert status_of(reply) == 200
        assert b"Connection: close" in reply
        # anything else is answered and the connection closes, a next request unanswered
        for request, status in (
            (batch_request(token="Bearer wrong"), 401),
            (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200),
            (b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"GET /flespi HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ):
            raw = served.connect()
            raw.sendall(request + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            replies = await asyncio.to_thread(read_reply, raw)  # until the receiver closes
            raw.close()
            assert status_of(replies) == status, replies
            assert b"Connection: close" in replies
            assert replies.count(b"HTTP/1.1 ") == 1, replies


def raise_file_limit(wanted: int) -> None:
    """This process's soft limit of open files, up to its hard limit; skip when too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    if limit < wanted:
        pytest.skip(f"{wanted} open files needed, the hard limit is {hard}")


@pytest.mark.parametrize(
    ("lines", "length"),
    [(60, 20), (7, 1000)],
    ids=["many-short-lines", "long-lines-near-the-limit"],
)
async def test_many_unfinished_headers_hold_a_few_kilobytes_each(
    tmp_path: Path, database_url: str, lines: int, length: int
) -> None:
    # a connection without credentials that never finishes its headers holds what it sent
    # and about 2 KiB; aiohttp's parser held 6 KiB and 430 bytes a line, whatever the line
    connections = 1000
    raise_file_limit(connections + 200)
    async with serving(tmp_path, database_url, "header_timeout = 30") as served:
        before = served.memory_kib()
        held = []
        sent = 0
        for i in range(connections):
            raw = served.connect()
            head = b"POST /flespi HTTP/1.1\r\nHost: x\r\n" + b"".join(
                f"X-F{i}-{line}: ".encode().ljust(length, b"b") + b"\r\n" for line in range(lines)
            )
            raw.sendall(head)
            sent += len(head)
            held.append(raw)
        await asyncio.sleep(1)
        grown = served.memory_kib() - before
        assert served.process.poll() is None
        # the stream still gets through while they hang
        assert await store_one(served) == 200
        for raw in held:
            raw.close()
    each, sent_each = grown / connections, sent / connections / 1024
    assert each < 4 + 1.25 * sent_each, f"{each:.1f} KiB a connection for {sent_each:.1f} KiB"


async def test_no_version_banner_in_any_reply(tmp_path: Path, database_url: str) -> None:
    async with serving(tmp_path, database_url) as served:
        for request in (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"BREW /flespi HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        ):
            raw = served.connect()
            raw.sendall(request)
            reply = await asyncio.to_thread(read_reply, raw)
            raw.close()
            head = reply.split(b"\r\n\r\n", 1)[0].lower()
            assert b"\r\nserver: flespi-receiver" in head, head
            assert b"python" not in head
            assert b"aiohttp" not in head


async def test_an_invalid_utf8_request_id_cannot_change_a_stored_batch_reply(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    async with serving(tmp_path, database_url) as served:
        for authorization in (TOKEN.encode(), b"Bearer wrong"):
            raw = served.connect()
            raw.sendall(
                b"POST /flespi HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"X-Request-Id: \xff\xfe\xfd\r\nAuthorization: "
                + authorization
                + f"\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
                + BODY
            )
            reply = await asyncio.to_thread(read_reply, raw)
            raw.close()
            assert status_of(reply) == (200 if authorization == TOKEN.encode() else 401)
            request_id = reply.split(b"X-Request-Id: ", 1)[1].split(b"\r\n", 1)[0]
            assert len(request_id) == 16
            assert request_id.isalnum()
        served.process.terminate()
        served.process.wait(20)
    assert await count(db) == 1
    batches = [e for e in log_events(served.config) if e["event"] == "batch"]
    assert [e["status"] for e in batches] == [200, 401]
    assert all(e["level"] != "error" for e in log_events(served.config))


def chunked_gzip_upload(port: int, body: bytes) -> int:
    """POST `body` gzip-compressed and chunked (no Content-Length); the reply's status."""
    compressed = zlib.compress(body, wbits=31)
    raw = socket.create_connection(("127.0.0.1", port))
    raw.settimeout(60)
    try:
        raw.sendall(
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
            + TOKEN.encode()
            + b"\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(0, len(compressed), 16384):
            piece = compressed[i : i + 16384]
            raw.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        raw.sendall(b"0\r\n\r\n")
        return status_of(read_reply(raw))
    finally:
        raw.close()


def upload_until_stored(port: int, body: bytes) -> list[int]:
    """Send a chunked gzip body until it is answered 200, as flespi would: its replies."""
    statuses = [chunked_gzip_upload(port, body)]
    while statuses[-1] == 503 and len(statuses) < 30:
        time.sleep(0.2)
        statuses.append(chunked_gzip_upload(port, body))
    return statuses


async def test_chunked_gzip_bodies_in_flight_are_bounded(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    uploads, in_flight, size = 8, 4, 4000
    # ~3 MB of JSON each, ~70 KB on the wire, without Content-Length
    bodies = [
        orjson.dumps([flespi_message(n * size + i, filler="x" * 400) for i in range(size)])
        for n in range(uploads)
    ]
    max_body_size = 4 * 1024 * 1024
    server = f"bodies_in_flight = {in_flight}\nmax_body_size = {max_body_size}"
    async with serving(tmp_path, database_url, server, acquire_timeout=120) as served:
        # small batches first, as many at once as may be in flight, so that what a batch
        # loads (a pool connection each, its statement cache) is in the baseline
        small = [orjson.dumps([flespi_message(-n - 1)] * 100) for n in range(in_flight)]
        warm = await asyncio.gather(
            *(asyncio.to_thread(chunked_gzip_upload, served.port, body) for body in small)
        )
        assert warm == [200] * in_flight
        for attempt in ("first", "resent"):
            served.reset_peak()
            before = served.memory_kib()
            replies = await asyncio.gather(
                *(asyncio.to_thread(upload_until_stored, served.port, body) for body in bodies)
            )
            peak = (served.memory_kib("VmHWM") - before) * 1024
            # each is stored in the end; on the way, a body that needed more room while every
            # slot was held by bodies waiting for more was told 503 (and sent again)
            assert all(statuses[-1] == 200 for statuses in replies), (attempt, replies)
            assert {code for statuses in replies for code in statuses} <= {200, 503}
            # a body of these messages costs more than a slot of max_body_size near its end
            # (its chunks, its rows, the fold of 4000 devices: two slots), also when resent
            # (split again window by window): the bodies take turns, and the memory for
            # bodies stays within max_body_size x bodies_in_flight
            assert peak < in_flight * max_body_size, (attempt, f"peak {peak >> 20} MiB")
    assert await count(db) == uploads * size + in_flight


async def test_bodies_told_there_is_no_room_let_go_of_their_memory_at_once(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    uploads, in_flight, max_body_size = 8, 4, 4 * 1024 * 1024
    # one message of a 3.5 MB string each: held about three times, so each needs every slot
    # near its end; all sent at once, most are told 503 while they grow, and sent again
    bodies = [orjson.dumps([{"ident": f"big{i}", "blob": "x" * 3_500_000}]) for i in range(uploads)]
    server = f"bodies_in_flight = {in_flight}\nmax_body_size = {max_body_size}"
    async with serving(tmp_path, database_url, server, acquire_timeout=60) as served:
        # one such body first, so that what the first large body loads is in the baseline
        warm = orjson.dumps([{"ident": "warm", "blob": "x" * 3_500_000}])
        assert await asyncio.to_thread(chunked_gzip_upload, served.port, warm) == 200
        served.reset_peak()
        before = served.memory_kib()
        replies = await asyncio.gather(
            *(asyncio.to_thread(upload_until_stored, served.port, body) for body in bodies)
        )
        peak = (served.memory_kib("VmHWM") - before) * 1024
    assert all(statuses[-1] == 200 for statuses in replies), replies
    assert any(503 in statuses for statuses in replies)  # the refusals did happen
    # what a refused body held is let go when its 503 is sent (asyncio's futures keep the
    # exception, whose traceback kept the body's frames alive until a full collection)
    assert peak < in_flight * max_body_size, f"peak {peak >> 20} MiB"
    assert await count(db) == uploads + 1


async def test_a_sender_slower_than_the_minimum_rate_gets_408_and_frees_the_pool(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    server = "min_body_rate = 10000"
    async with serving(tmp_path, database_url, server, acquire_timeout=9, pool=1) as served:
        # one pool connection, held by a body over 64 KB that trickles in
        slow = served.connect()
        slow.sendall(
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + TOKEN.encode()
            + b"\r\nContent-Length: 1000000\r\n\r\n["
        )
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                for _ in range(100):
                    await asyncio.sleep(0.1)
                    slow.sendall(b" " * 50)

        trickling = asyncio.create_task(trickle())
        stored = await store_one(served)
        reply = await asyncio.to_thread(read_reply, slow)
        took = time.monotonic() - started
        trickling.cancel()
        slow.close()
    assert status_of(reply) == 408
    assert b"min_body_rate" in reply
    assert took < 8
    # the other batch waited for the pool connection and was stored
    assert stored == 200
    assert await count(db) == 1


async def test_a_body_that_grows_never_takes_the_slot_of_another_stream(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    # one message of a 700 KB string is held about three times: it needs every slot of
    # 1 MiB there is, but one stays the other stream's
    other = '[[streams]]\nname = "other"\npath = "/other"\nauthorization = ["Bearer other-1"]\n'
    large = orjson.dumps([{"ident": "big", "blob": "x" * 700_000}])
    server = f"bodies_in_flight = 2\nmax_body_size = {1024 * 1024}"
    async with serving(tmp_path, database_url, server, acquire_timeout=1, streams=other) as served:
        slow = served.connect()
        slow.sendall(
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
            b"Content-Length: " + str(len(large)).encode() + b"\r\n\r\n" + large[:-10]
        )
        await asyncio.sleep(0.5)  # the large message is held, and its body has grown
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{served.port}/other"
            headers = {"Authorization": "Bearer other-1"}
            body = orjson.dumps([flespi_message(1)])
            async with session.post(url, data=body, headers=headers) as reply:
                assert reply.status == 200
        slow.sendall(large[-10:])
        assert status_of(await asyncio.to_thread(read_until_reply, slow)) == 200
        slow.close()
        events = log_events(served.config)
    assert await count(db) == 2
    assert any(e["event"].startswith("body needs more memory than one stream") for e in events)


async def test_growing_bodies_of_one_stream_never_take_the_slot_of_another_stream(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    # two bodies of `main`, each holding a large message (about two slots of 1 MiB each):
    # counted by bodies, they took all three slots between them and `other` waited for its
    # one (503); counted by slots, `main` holds at most two of them
    other = '[[streams]]\nname = "other"\npath = "/other"\nauthorization = ["Bearer other-1"]\n'
    server = f"bodies_in_flight = 3\nmax_body_size = {1024 * 1024}"
    large = [orjson.dumps([{"ident": f"big{i}", "blob": "x" * 450_000}]) for i in range(2)]
    async with serving(tmp_path, database_url, server, acquire_timeout=5, streams=other) as served:
        slow = []
        for body in large:
            raw = served.connect()
            raw.sendall(
                b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:-10]
            )
            slow.append(raw)
        await asyncio.sleep(0.5)  # the large messages are held, their bodies have grown
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{served.port}/other"
            headers = {"Authorization": "Bearer other-1"}
            started = time.monotonic()
            async with session.post(url, data=BODY, headers=headers) as reply:
                assert reply.status == 200
            assert time.monotonic() - started < 2  # not after acquire_timeout
        statuses = []
        for raw, body in zip(slow, large, strict=True):
            with contextlib.suppress(OSError):  # refused already: the connection is closed
                raw.sendall(body[-10:])
            statuses.append(status_of(await asyncio.to_thread(read_until_reply, raw)))
            raw.close()
    # both fit in `main`'s two slots only one after the other: when each waits for the
    # other's slot, the last to ask is told 503 (sent again, it is stored)
    assert sorted(statuses) in ([200, 200], [200, 503]), statuses
    assert await count(db) == 1 + statuses.count(200)


async def test_a_sender_that_bursts_then_stops_gets_408_without_holding_the_pool_long(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    # 490 KB at once would keep 8 KB/s "on average" for a minute: the stall is what counts
    async with serving(tmp_path, database_url, "body_timeout = 60") as served:
        raw = served.connect()
        raw.settimeout(30)
        raw.sendall(
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
            b"Content-Length: 1000000\r\n\r\n[" + b" " * 490_000
        )
        started = time.monotonic()
        reply = await asyncio.to_thread(read_reply, raw)
        took = time.monotonic() - started
        raw.close()
    assert status_of(reply) == 408
    assert b"min_body_rate" in reply
    assert took < 20  # MAX_STALL, not body_timeout
    assert await count(db) == 0


async def test_one_stream_cannot_take_the_other_streams_bodies_in_flight(
    tmp_path: Path, database_url: str
) -> None:
    # a leaked token sending slow bodies holds its own stream's share only: with 3 bodies in
    # flight and 2 streams, one stream may hold 2, and the other still stores
    other = '[[streams]]\nname = "other"\npath = "/other"\nauthorization = ["Bearer other-1"]\n'
    body = orjson.dumps([flespi_message(i) for i in range(3)])
    async with serving(
        tmp_path, database_url, "bodies_in_flight = 3", acquire_timeout=1, streams=other
    ) as served:
        slow = [served.connect() for _ in range(3)]
        head = (
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        for raw in slow:
            raw.sendall(head + body[:10])  # and then nothing, for now
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{served.port}/other"
            headers = {"Authorization": "Bearer other-1"}
            async with session.post(url, data=body, headers=headers) as reply:
                assert reply.status == 200
        # the third slow body of the first stream waited for a slot of its own stream
        third = await asyncio.to_thread(read_reply, slow[2])
        slow[2].close()
        assert status_of(third) == 503
        assert b"bodies in flight" in third
        for raw in slow[:2]:
            raw.sendall(body[10:])
            assert status_of(await asyncio.to_thread(read_until_reply, raw)) == 200
            raw.close()


async def test_a_sender_refused_mid_upload_gets_its_reply_not_a_reset(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    # one slot, held by a body still arriving: a second body, sent whole before its reply is
    # read (as most HTTP clients do), waits acquire_timeout and is told 503. Closing with its
    # bytes still arriving reset the connection, and the reply was lost with it
    server = f"bodies_in_flight = 1\nmax_body_size = {8 * 1024 * 1024}"
    held = orjson.dumps([flespi_message(i) for i in range(200)])
    large = orjson.dumps([{**flespi_message(1000 + i), "pad": "p" * 1000} for i in range(4000)])
    async with serving(tmp_path, database_url, server, acquire_timeout=1) as served:
        slow = served.connect()
        slow.sendall(
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
            b"Content-Length: " + str(len(held)).encode() + b"\r\n\r\n" + held[:-10]
        )
        await asyncio.sleep(0.3)

        def send_whole_then_read() -> bytes:
            raw = served.connect()
            try:
                raw.sendall(batch_request(large))
                return read_reply(raw)
            finally:
                raw.close()

        replies = await asyncio.gather(*(asyncio.to_thread(send_whole_then_read) for _ in range(3)))
        slow.sendall(held[-10:])
        assert status_of(await asyncio.to_thread(read_until_reply, slow)) == 200
        slow.close()
    for reply in replies:
        assert status_of(reply) == 503, reply[:200]
        assert b"Retry-After: " in reply
        assert b"Connection: close" in reply
    assert await count(db) == 200


async def test_empty_lines_before_a_request_count_but_never_make_a_second_reply(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    # RFC 9112 2.2: empty lines before a request line are skipped. They count within
    # max_header_size; past it, one 431. Counted as headers but skipped by the parser, they
    # made a second reply (a 431 after the batch's 200) or a body that was never read
    async with serving(tmp_path, database_url) as served:
        for lines, request, expected in (
            (100, batch_request(), [200]),  # on a new connection
            (5000, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", [431]),  # 10 000 bytes > 8 KiB
        ):
            raw = served.connect()
            raw.sendall(b"\r\n" * lines + request)
            replies = await asyncio.to_thread(read_until_reply, raw)
            raw.settimeout(1.5)
            with contextlib.suppress(TimeoutError, OSError):
                replies += await asyncio.to_thread(raw.recv, 65536)
            raw.close()
            statuses = [int(part.split(b" ", 1)[0]) for part in replies.split(b"HTTP/1.1 ")[1:]]
            assert statuses == expected, replies
        # on a kept-alive connection, between two batches
        raw = served.connect()
        raw.sendall(batch_request())
        assert status_of(await asyncio.to_thread(read_until_reply, raw)) == 200
        raw.sendall(b"\r\n" * 100 + batch_request(orjson.dumps([flespi_message(7)])))
        second = await asyncio.to_thread(read_until_reply, raw)
        raw.settimeout(1.5)
        with contextlib.suppress(TimeoutError, OSError):
            second += await asyncio.to_thread(raw.recv, 65536)
        raw.close()
        assert second.count(b"HTTP/1.1 ") == 1, second
        assert status_of(second) == 200
    assert await count(db) == 2  # flespi_message(1) twice is one message


async def test_a_sender_refused_on_its_headers_alone_has_its_body_left_unread(
    tmp_path: Path, database_url: str
) -> None:
    # 415 (a coding not supported) is decided on the headers: the connection closes at once,
    # the body is not read (only refusals for room or mid-body are followed by a drain)
    async with serving(tmp_path, database_url) as served:
        raw = served.connect()
        raw.sendall(
            b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: " + TOKEN.encode() + b"\r\n"
            b"Content-Encoding: br\r\nContent-Length: 900000\r\n\r\n"
        )
        reply = await asyncio.to_thread(read_until_reply, raw)
        started = time.monotonic()
        raw.settimeout(5)
        closed = await asyncio.to_thread(raw.recv, 65536)
        waited = time.monotonic() - started
        raw.close()
    assert status_of(reply) == 415
    assert closed == b""
    assert waited < 0.5, f"the receiver waited {waited:.1f} s for a body it refused"
