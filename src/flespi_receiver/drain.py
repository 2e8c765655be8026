"""A sender's reply delivered before its connection closes, when its body was not read whole.

A reply sent while the client is still uploading (503 when there was no room for the body, a
body refused mid-way) is followed by the connection's close. Closing a socket with unread
data in it, or with data still arriving, makes the kernel send a reset, and a client that
reads its reply only after it has sent its whole body (most HTTP clients) then gets the reset
instead of the reply. For a request that carried a stream's credentials, the rest of the body
is read and dropped, undecoded (aiohttp's decompression is off), for at most `DRAIN_SECONDS`
and the body's declared size, after the reply is sent, and only while it keeps coming (a
pause of `DRAIN_IDLE_SECONDS` ends it). Not after a 408 (that sender is too slow already),
nor after a refusal on the headers alone: `ingest._drained` decides. A stranger's body is
never read (it was refused on its headers).
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

DRAIN_SECONDS = 5.0
# a client that sends nothing for this long is not sending its body: close now
DRAIN_IDLE_SECONDS = 1.0


async def reply_then_drain(
    request: web.Request, response: web.StreamResponse, max_bytes: int
) -> None:
    """Send `response` whole, then read and drop what is left of the body: up to `max_bytes`
    on the wire and `DRAIN_SECONDS`, while no pause lasts `DRAIN_IDLE_SECONDS`; a body
    declared larger than `max_bytes` is not read at all. Never raises for the client's faults
    (a reset, a broken body)."""
    declared = request.content_length
    with contextlib.suppress(ConnectionError):
        await response.prepare(request)
        await response.write_eof()
    if declared is not None and declared > max_bytes:
        return
    read = 0
    content = request.content
    with contextlib.suppress(Exception):  # the client's: a reset, a broken chunk, a timeout
        async with asyncio.timeout(DRAIN_SECONDS):
            while read <= max_bytes and not content.is_eof():
                async with asyncio.timeout(DRAIN_IDLE_SECONDS):
                    chunk = await content.readany()
                if not chunk:
                    break
                read += len(chunk)
