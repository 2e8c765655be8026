"""The reference the benchmark compares against: a receiver as the quick-start samples write it.

json.loads the body and `executemany` one INSERT per message into a copy of `messages`,
computing the same columns. No deduplication, no quarantine: just the common baseline.
Run as `python -m flespi_receiver.naive DSN PORT TABLE`.
"""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg
from aiohttp import web

from flespi_receiver.fields import columns
from flespi_receiver.messages import identity_of

INSERT = """
INSERT INTO {table} (stream, ident, ts, server_ts, channel_id, device_id, latitude, longitude,
                     partition_ts, payload, message_hash)
VALUES ($1, $2, to_timestamp($3), to_timestamp($4), $5, $6, $7, $8, to_timestamp($9), $10, $11)
"""


async def serve(dsn: str, port: int, table: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    insert = INSERT.format(table=table)

    async def handle(request: web.Request) -> web.Response:
        messages = json.loads(await request.read())
        rows = []
        for message in messages:
            payload = json.dumps(message)
            raw = payload.encode()
            rows.append(("main", *columns(message, raw), payload, identity_of(raw)))
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany(insert, rows)
        return web.Response(text="OK")

    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_post("/flespi", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
