"""The log is JSON lines, one object each, whoever logs; a bug is still one `batch` line."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from structlog.testing import capture_logs

from flespi_receiver import ingest

from conftest import ClientFactory
from helpers import AUTH, flespi_message

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
