"""A request body, read as it arrives, within the size and time limits of the server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import StreamReader
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

from flespi_receiver.errors import BodyIncomplete, BodyTimeout, BodyTooLarge


class BodyReader:
    """Reads a body chunk by chunk and keeps what it read, so that it can also give the whole.

    The size counts decompressed bytes (aiohttp decompresses as it reads), so a small gzip
    bomb is stopped at max_size; the time limit counts from the reader's creation.
    """

    def __init__(self, content: StreamReader, max_size: int, timeout: float) -> None:
        self._content = content
        self._max_size = max_size
        self._deadline = asyncio.get_running_loop().time() + timeout
        self._chunks: list[bytes] = []
        self._complete = False
        self.size = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        """The chunks not read yet, as they arrive."""
        while (chunk := await self._next()) is not None:
            yield chunk

    async def read_all(self) -> bytes:
        """The whole body, chunks read before included."""
        while await self._next() is not None:
            pass
        return b"".join(self._chunks)

    async def _next(self) -> bytes | None:
        if self._complete:
            return None
        try:
            async with asyncio.timeout_at(self._deadline):
                chunk = await self._content.readany()
        except TimeoutError:
            # not a TimeoutError: inside a COPY, asyncpg would take that for its own timeout
            raise BodyTimeout from None
        except (ConnectionError, HttpProcessingError, RequestPayloadError) as exc:
            # the client went away, or sent a body that can't be decompressed; not an OSError
            # either: that would read as the database being away
            raise BodyIncomplete(" ".join(str(exc).split()) or type(exc).__name__) from None
        if not chunk:
            self._complete = True
            return None
        self.size += len(chunk)
        if self.size > self._max_size:
            raise BodyTooLarge
        self._chunks.append(chunk)
        return chunk
