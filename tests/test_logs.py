"""The log is JSON lines, one object each, whoever logs; a bug is still one `batch` line."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from flespi_receiver import ingest
from flespi_receiver.embedded import free_port

from conftest import ClientFactory
from helpers import (
    AUTH,
    TOKEN,
    config_file,
    flespi_message,
    log_events,
    receiver_process,
    wait_until_serving,
)

EMIT = """
import logging, structlog
from flespi_receiver.config import LogSettings
from flespi_receiver.log import configure_logging

configure_logging(LogSettings(format="json", level="info"))
secret = "Bearer do-not-log-me"
try:
    {}["missing"]
except KeyError:
    logging.getLogger("aiohttp.server").exception("Error handling request")
    structlog.get_logger("flespi_receiver.app").exception("request failed", path="/flespi")
logging.getLogger("asyncio").warning("a plain %s line", "stdlib")
"""


def test_every_line_is_one_json_object_with_structured_exceptions() -> None:
    done = subprocess.run([sys.executable, "-c", EMIT], capture_output=True, check=True, timeout=30)
    lines = done.stderr.decode().splitlines()
    events = [orjson.loads(line) for line in lines]  # each line alone is a JSON object
    assert [e["event"] for e in events] == [
        "Error handling request",
        "request failed",
        "a plain stdlib line",
    ]
    assert events[0]["logger"] == "aiohttp.server"
    for event in events[:2]:
        (exception,) = event["exception"]
        assert (exception["exc_type"], exception["exc_value"]) == ("KeyError", "'missing'")
        assert exception["frames"]
    assert "do-not-log-me" not in done.stderr.decode()  # no local values in tracebacks


async def test_a_bug_is_a_500_with_one_batch_line_and_a_count(
    receiver: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fake: a bug can't be produced for real (it would be fixed); it stands in for any
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the receiver")

    monkeypatch.setattr(ingest, "store_pooled", broken)
    client = await receiver()
    with capture_logs() as logs:
        reply = await client.post("/flespi", data=orjson.dumps([flespi_message(1)]), headers=AUTH)
    assert reply.status == 500
    assert "not stored" in (await reply.json())["error"]
    (line,) = [e for e in logs if e["event"] == "batch"]
    assert (line["status"], line["log_level"]) == (500, "error")
    assert isinstance(line["exc_info"], RuntimeError)
    assert len(logs) == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'flespi_receiver_requests_total{status="500",stream="main"} 1.0' in metrics


# each is a request that reaches no stream handler: the router, aiohttp's parser, the header
# limits answer it, and still as one `batch` line and one count
NO_STREAM_REQUESTS = [
    (404, b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]"),
    (405, b"GET /flespi HTTP/1.1\r\nHost: x\r\n\r\n"),
    (404, b"CONNECT 127.0.0.1:5432 HTTP/1.1\r\nHost: 127.0.0.1:5432\r\n\r\n"),
    (400, b"POST /flespi HTTP/1.1\r\nHost: x\r\nBad\x01Header: " + TOKEN.encode() + b"\r\n\r\n"),
    # one line too long for the parser, lines too long together, too many lines
    (431, b"POST /flespi HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 8000 + b"\r\n\r\n"),
    (431, b"POST /flespi HTTP/1.1\r\nHost: x\r\n" + (b"X-Filler: " + b"b" * 300 + b"\r\n") * 20),
    (431, b"POST /flespi HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: 1\r\n" * 150 + b"\r\n"),
    # complete headers over the limit, arriving in one piece with the body: never served
    (
        431,
        b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + TOKEN.encode()
        + b"\r\n"
        + (b"X-Big: " + b"c" * 1000 + b"\r\n") * 5
        + b"Content-Length: 2\r\n\r\n[]",
    ),
    # the same, padded with spaces, which the parser strips from the values
    (
        431,
        b"POST /flespi HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + TOKEN.encode()
        + b"\r\n"
        + (b"X-Big:" + b" " * 1000 + b"c\r\n") * 5
        + b"Content-Length: 2\r\n\r\n[]",
    ),
]


async def test_replies_outside_a_stream_are_one_batch_line_and_one_count(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    text = config.read_text().replace("[server]\n", "[server]\nmax_header_size = 4096\n", 1)
    config.write_text(text)
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        for status, request in NO_STREAM_REQUESTS:
            raw = socket.create_connection(("127.0.0.1", port))
            raw.settimeout(10)
            raw.sendall(request)
            reply = await asyncio.to_thread(raw.recv, 65536)
            raw.close()
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == str(status).encode(), reply
            assert orjson.loads(body)["error"], reply  # JSON with a reason, like every reply
            assert TOKEN.encode() not in reply  # the parser's error is not echoed
            assert b"Connection: close" in head
            assert b"X-Request-Id: " in head
            assert b"Server: flespi-receiver\r\n" in head
        metrics = await asyncio.to_thread(http_get, port, "/metrics")
        process.terminate()
        assert process.wait(20) == 0
    lines = [e for e in log_events(config) if e["event"] == "batch"]
    assert sorted(e["status"] for e in lines) == sorted(s for s, _ in NO_STREAM_REQUESTS)
    assert all(e["reason"] and e["request_id"] for e in lines)
    assert not [e for e in log_events(config) if e.get("logger") == "aiohttp.server"]
    for status, times in ((400, 1), (404, 2), (405, 1)):
        assert f'flespi_receiver_requests_total{{status="{status}",stream=""}} {times}.0' in metrics
    assert 'flespi_receiver_requests_total{status="431",stream=""} 5.0' in metrics


async def test_replies_outside_a_stream_are_counted_all_but_logged_at_most_60_a_minute(
    tmp_path: Path, database_url: str
) -> None:
    # anyone can send 404s: each is counted, but a scanner's thousands don't fill the disk
    port = free_port()
    config = config_file(tmp_path, database_url, port)
    sent = 150
    with receiver_process(config) as process:
        await wait_until_serving(port, process)

        def scan() -> None:
            for i in range(sent):
                with contextlib.suppress(urllib.error.HTTPError):
                    http_get(port, f"/scan-{i}-" + "A" * 2000)

        await asyncio.to_thread(scan)
        metrics = await asyncio.to_thread(http_get, port, "/metrics")
        process.terminate()
        assert process.wait(20) == 0
    lines = [e for e in log_events(config) if e["event"] == "batch"]
    assert f'flespi_receiver_requests_total{{status="404",stream=""}} {sent}.0' in metrics
    # 60 in a minute; a minute that began during the scan may add up to 60 more
    assert 60 <= len(lines) <= 120 < sent, len(lines)
    assert all(e["status"] == 404 and e["level"] == "warning" for e in lines)


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return str(reply.read().decode())
