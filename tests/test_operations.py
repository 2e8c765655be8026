"""What an operator watches: metrics after known batches, readiness with the database down."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import asyncpg
import orjson
from prometheus_client.parser import text_string_to_metric_families

from flespi_receiver.embedded import EmbeddedPostgres, free_port

from conftest import ClientFactory
from helpers import (
    AUTH,
    config_file,
    flespi_message,
    receiver_process,
    wait_until_serving,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_what_happened(receiver: ClientFactory) -> None:
    client = await receiver()
    batch = [flespi_message(i) for i in range(3)]
    await client.post("/flespi", data=orjson.dumps(batch), headers=AUTH)
    bad = b"[" + orjson.dumps(flespi_message(0)) + b', {"a": 1, "a": 2}]'
    await client.post("/flespi", data=bad, headers=AUTH)
    await client.post("/flespi", data=b"[]", headers={"Authorization": "Bearer wrong"})

    reply = await client.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    found = samples(await reply.text())

    def value(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted({"stream": "main", **labels}.items())))]

    assert value("flespi_receiver_messages_total", outcome="stored") == 3
    assert value("flespi_receiver_messages_total", outcome="duplicate") == 1
    assert value("flespi_receiver_messages_total", outcome="rejected") == 1
    assert value("flespi_receiver_requests_total", status="200") == 2
    assert value("flespi_receiver_requests_total", status="401") == 1
    assert value("flespi_receiver_auth_failures_total") == 1
    assert value("flespi_receiver_batch_messages_count") == 2
    assert value("flespi_receiver_batch_messages_sum") == 5
    assert value("flespi_receiver_request_duration_seconds_count") == 3
    assert value("flespi_receiver_last_commit_timestamp_seconds") > 1.7e9
    assert found[("flespi_receiver_db_connections_in_use", ())] == 0
    assert found[("flespi_receiver_db_connections", ())] >= 1


async def test_database_errors_are_counted(receiver: ClientFactory, db: asyncpg.Connection) -> None:
    client = await receiver()
    async with db.transaction():
        await db.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        pending = asyncio.create_task(
            client.post("/flespi", data=orjson.dumps([flespi_message(1)]), headers=AUTH)
        )
        pid = None
        while not pid:
            pid = await db.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'flespi-receiver' "
                "AND wait_event_type = 'Lock'"
            )
        await db.execute("SELECT pg_terminate_backend($1)", pid)
        assert (await pending).status == 503
    found = samples(await (await client.get("/metrics")).text())
    errors = [
        v for (name, _), v in found.items() if name == "flespi_receiver_database_errors_total"
    ]
    assert sum(errors) == 1


async def test_readiness_follows_the_database(
    receiver: ClientFactory, embedded_server: EmbeddedPostgres
) -> None:
    client = await receiver()
    assert (await client.get("/readyz")).status == 200
    await asyncio.to_thread(embedded_server.stop)
    try:
        down = await client.get("/readyz")
        assert down.status == 503
        assert "database unavailable" in (await down.json())["error"]
        assert (await client.get("/healthz")).status == 200
    finally:
        await asyncio.to_thread(embedded_server.start)
    for _ in range(100):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("not ready again after the database came back")


async def test_metrics_on_a_port_of_their_own(tmp_path: Path, database_url: str) -> None:
    port, metrics_port = free_port(), free_port()
    config = config_file(tmp_path, database_url, port)
    config.write_text(config.read_text() + f"[metrics]\nport = {metrics_port}\n")
    with receiver_process(config) as process:
        await wait_until_serving(port, process)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
                assert reply.status == 200
                assert "flespi_receiver_requests_total" in await reply.text()
            async with session.get(f"http://127.0.0.1:{port}/metrics") as reply:
                assert reply.status == 404
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
