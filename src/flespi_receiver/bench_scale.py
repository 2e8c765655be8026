"""`flespi-receiver bench --growth` and `--memory`: throughput as the table grows, and memory.

Growth: the table is filled server-side to each checkpoint, then the receiver (as its own
process, fed by the emulator) is measured there. Memory: the receiver's peak RSS while it
ingests millions of messages, and the cost of one body at `max_body_size`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from flespi_receiver.bench import (
    COUNT_STORED,
    SCHEMA,
    TOKEN,
    peak_rss_mb,
    prepare_database,
    process,
    receiver_config,
    wait_for_port,
)
from flespi_receiver.embedded import free_port
from flespi_receiver.emulator import (
    StreamEmulator,
    encode_messages,
    sample_messages,
)

# Filler rows like the emulator's messages, each with its own ident, timestamp and identity.
FILL = """
INSERT INTO flespi.messages (stream, ident, ts, server_ts, channel_id, device_id, latitude,
                             longitude, payload, message_hash, partition_ts)
SELECT 'main', p->>'ident', to_timestamp((p->>'timestamp')::float8),
       to_timestamp((p->>'timestamp')::float8 + 1), 1234, 5000000 + i % 5000, 54.5, 25.5, p,
       substring(sha256(convert_to(p::text, 'UTF8')) for 16),
       to_timestamp((p->>'timestamp')::float8)
FROM generate_series($2::bigint, $3::bigint) AS i,
     LATERAL (SELECT jsonb_set(jsonb_set($1::jsonb, '{ident}',
                                         to_jsonb('fill' || (i % 5000)::text)),
                               '{timestamp}', to_jsonb(1600000000 + i)) AS p) AS filler
"""
FILL_STEP = 250_000
# a benchmark batch refused this often is a misconfiguration, not noise
GIVE_UP_AFTER = 20


async def _measure(url: str, workdir: Path, seed: int, batch_size: int, count: int) -> float:
    port = free_port()
    config = receiver_config(workdir, url, port, 512 * 1024 * 1024)
    command = [sys.executable, "-m", "flespi_receiver", "serve", "--config", str(config)]
    messages = encode_messages(sample_messages(count, seed=seed, start=seed * 10**7))
    with process(command) as proc:
        await wait_for_port(port, proc)
        emulator = StreamEmulator(
            f"http://127.0.0.1:{port}/flespi", authorization=TOKEN, max_attempts=GIVE_UP_AFTER
        )
        started = time.perf_counter()
        await emulator.run(messages, batch_size)
        return count / (time.perf_counter() - started)


async def growth_curve(
    admin_url: str, rows: int, step: int, batch_size: int, count: int
) -> dict[str, Any]:
    url = await prepare_database(admin_url)
    # the filler rows are history: they don't take part in device state or notifications
    conn = await asyncpg.connect(
        url,
        server_settings={
            "flespi_receiver.writer": "receiver",
            "flespi_receiver.device_state": "off",
            "flespi_receiver.notify_channel": "",
        },
    )
    template = orjson.dumps(sample_messages(1)[0]).decode()
    curve: list[dict[str, int]] = []
    filled = 0
    try:
        with tempfile.TemporaryDirectory() as workdir:
            for checkpoint in range(0, rows + 1, step):
                while filled < checkpoint:
                    upto = min(filled + FILL_STEP, checkpoint)
                    await conn.execute(FILL, template, filled + 1, upto)
                    filled = upto
                await conn.execute(f"VACUUM ANALYZE {SCHEMA}.messages")
                # the fill's dirty pages are written now, not during the measurement
                await conn.execute("CHECKPOINT")
                table_rows = await conn.fetchval(COUNT_STORED)
                # the median of three short runs: one busy second on a shared machine
                # does not make a point of the curve
                rates = [
                    await _measure(url, Path(workdir), len(curve) * 3 + i + 1, batch_size, count)
                    for i in range(3)
                ]
                rate = statistics.median(rates)
                curve.append({"rows": table_rows, "messages_per_second": round(rate)})
                first = curve[0]["messages_per_second"]
                print(
                    f"{table_rows:>10} rows  {rate:>8.0f} msg/s  {rate / first:>5.2f} of the "
                    "empty table",
                    flush=True,
                )
    finally:
        await conn.close()
    summary = {"growth": curve, "batch_size": batch_size}
    print(orjson.dumps(summary).decode())
    return summary


async def memory_profile(admin_url: str, messages: int, max_body_size: int) -> dict[str, Any]:
    url = await prepare_database(admin_url)
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        config = receiver_config(Path(workdir), url, port, max_body_size)
        command = [sys.executable, "-m", "flespi_receiver", "serve", "--config", str(config)]
        with process(command) as proc:
            await wait_for_port(port, proc)
            target = f"http://127.0.0.1:{port}/flespi"
            emulator = StreamEmulator(target, authorization=TOKEN, max_attempts=GIVE_UP_AFTER)
            chunk = 100_000
            for start in range(0, messages, chunk):
                size_now = min(chunk, messages - start)
                encoded = encode_messages(sample_messages(size_now, seed=start, start=start))
                await emulator.run(encoded, 1000)
            after_stream = peak_rss_mb(proc.pid)
            # one body as large as allowed
            body_messages: list[bytes] = []
            size = 2
            candidates = encode_messages(sample_messages(max_body_size // 500, start=10**8))
            for item in candidates:
                if size + len(item) + 1 > max_body_size:
                    break
                body_messages.append(item)
                size += len(item) + 1
            del candidates
            big = StreamEmulator(
                target, authorization=TOKEN, timeout=600, max_attempts=GIVE_UP_AFTER
            )
            await big.run(body_messages, len(body_messages))
            after_big = peak_rss_mb(proc.pid)
    summary = {
        "messages_streamed": messages,
        "peak_rss_mb_streaming": round(after_stream, 1),
        "big_body_mb": round(size / 2**20, 1),
        "peak_rss_mb_after_big_body": round(after_big, 1),
        "big_body_peak_cost_ratio": round((after_big - after_stream) * 2**20 / size, 2),
    }
    print(orjson.dumps(summary).decode())
    return summary
