"""A request body, read as it arrives and decompressed here, within the size and time limits.

aiohttp's own decompression is off (`auto_decompress=False` in app.py), so a body is only
looked at after the request's credentials were checked, every coding is decoded the same way
on every aiohttp version, and a compressed stream that does not end properly is seen as such.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import StreamReader
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

from flespi_receiver.errors import BodyIncomplete, BodyTimeout, BodyTooLarge

# Content-Encoding values decoded here (RFC 9110: x-gzip is gzip); anything else gets 415
CODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate"})
# bytes handed on at a time, as sent or decompressed: a bomb is stopped at max_size, not after,
# and what a piece becomes while it is split (its elements, about 2.5 times a piece of tiny
# messages) stays small whatever the connection has buffered (body_cost.py)
_PIECE = 256 * 1024
# seconds a body may take before min_rate applies (TCP slow start, a proxy's first buffer)
MIN_RATE_GRACE = 5.0
# seconds a body may stop arriving, whatever it sent before, when min_rate applies: a burst
# does not buy a stall that holds a pool connection
MAX_STALL = 10.0


def content_coding(header: str | None) -> str | None:
    """The one coding of a Content-Encoding header ("" when none), or None when unsupported."""
    codings = [c.strip().lower() for c in (header or "").split(",") if c.strip()]
    if not codings:
        return ""
    if len(codings) > 1 or codings[0] not in CODINGS:
        return None
    return "" if codings[0] == "identity" else codings[0]


class _Decoder:
    """Decompresses gzip (every member of a multi-member stream) or deflate (zlib or raw).

    Output comes a piece of at most _PIECE bytes at a time, whatever the compression ratio,
    so that memory stays bounded until the size limit stops a bomb. Raises BodyIncomplete
    for a stream that is corrupt, ends before its end, or has bytes after its end.
    """

    def __init__(self, coding: str) -> None:
        self._gzip = coding in ("gzip", "x-gzip")
        self._name = "gzip" if self._gzip else "deflate"
        self._input = b""
        # deflate: created once the first two bytes tell a zlib header from raw deflate
        self._inflate: zlib._Decompress | None = zlib.decompressobj(31) if self._gzip else None
        self._draining = False  # the last piece was cut at _PIECE: zlib may hold more

    def push(self, data: bytes) -> None:
        self._input += data

    def pull(self) -> bytes:
        """The next piece of output; b"" when more input is needed."""
        while True:
            inflate = self._inflate
            if inflate is None:
                if len(self._input) < 2:
                    return b""
                inflate = self._inflate = zlib.decompressobj(
                    15 if _zlib_header(self._input) else -15
                )
            if inflate.eof:
                rest, self._input = inflate.unused_data + self._input, b""
                if not rest:
                    return b""
                if not self._gzip:
                    raise BodyIncomplete("bytes after the end of the deflate stream")
                # RFC 1952: a gzip stream may hold several members, one after another
                inflate = self._inflate = zlib.decompressobj(31)
                self._input = rest
            if not self._input and not self._draining:
                return b""
            try:
                piece = inflate.decompress(self._input, _PIECE)
            except zlib.error as exc:
                raise BodyIncomplete(f"{self._name} stream is corrupt: {exc}") from None
            # at the end of a stream the rest is in unused_data (and in unconsumed_tail too)
            self._input = b"" if inflate.eof else inflate.unconsumed_tail
            self._draining = len(piece) == _PIECE
            if piece:
                return piece

    def finish(self) -> None:
        """The input has ended (and pull gave all it could): was the stream complete?"""
        if self._inflate is None or not self._inflate.eof:
            raise BodyIncomplete(f"{self._name} stream ends before its end (truncated)")


def _zlib_header(data: bytes) -> bool:
    """RFC 1950: deflate with a window of at most 32 KB, header bytes a multiple of 31."""
    return data[0] & 0x0F == 8 and data[0] >> 4 <= 7 and (data[0] << 8 | data[1]) % 31 == 0


class BodyReader:
    """Reads a body chunk by chunk and keeps what it read, so that it can also give the whole.

    `coding` is what `content_coding` returned; the size counts decompressed bytes, so a gzip
    bomb is stopped at max_size. The time limit counts from the reader's creation. With a
    `min_rate` (bytes per second as sent, 0 = none), the body must also keep up: t seconds
    after the start, at least min_rate * (t - MIN_RATE_GRACE) bytes must have arrived, and no
    wait for more may last over MAX_STALL seconds, else BodyTimeout.
    """

    def __init__(
        self,
        content: StreamReader,
        coding: str,
        max_size: int,
        timeout: float,
        min_rate: int = 0,
    ) -> None:
        self._content = content
        self._decoder = _Decoder(coding) if coding else None
        self._max_size = max_size
        self._started = asyncio.get_running_loop().time()
        self._deadline = self._started + timeout
        self._min_rate = min_rate
        self._chunks: list[bytes] = []
        self._complete = False
        self.received = 0  # bytes as sent
        self.size = 0  # bytes after decompression
        # takes room in the memory for bodies in flight for this many bytes, waiting for it
        # (else raises BodyTooBusy); None: no such accounting (body_slots.py)
        self.make_room: Callable[[int], Awaitable[None]] | None = None

    async def need(self, size: int) -> None:
        """Hold room for `size` bytes of memory (the body and what is made of it, body_cost.py)
        before holding more. Raises BodyTooBusy when there was no room."""
        if self.make_room is not None:
            await self.make_room(size)

    def remaining(self) -> float:
        """Seconds left for the body to arrive (0 once past its deadline)."""
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    async def chunks(self) -> AsyncIterator[bytes]:
        """Every chunk of the body from its start: those read before, then the others as they
        arrive."""
        for held in range(len(self._chunks)):
            yield self._chunks[held]
        while (chunk := await self._next()) is not None:
            yield chunk

    async def read_some(self, size: int) -> bool:
        """Read until `size` bytes (after decompression) are held or the body has ended;
        True when it has ended."""
        while self.size < size:
            if await self._next() is None:
                return True
        return False

    async def read_all(self) -> bytes:
        """The whole body, chunks read before included."""
        while await self._next() is not None:
            pass
        body = b"".join(self._chunks)
        self._chunks = [body]  # held once, not twice, while the body is worked on
        return body

    async def _next(self) -> bytes | None:
        while True:
            chunk = self._decoder.pull() if self._decoder else b""
            if chunk:
                break
            if self._complete:
                return None
            data = await self._receive()
            if not data:
                self._complete = True
                if self._decoder:
                    self._decoder.finish()
            elif self._decoder:
                self._decoder.push(data)
            else:
                chunk = data
                break
        self.size += len(chunk)
        if self.size > self._max_size:
            raise BodyTooLarge
        self._chunks.append(chunk)
        return chunk

    def _next_deadline(self) -> float:
        """When the next data must have arrived, by the body timeout and the minimum rate."""
        if not self._min_rate:
            return self._deadline
        keeping_up = self._started + MIN_RATE_GRACE + self.received / self._min_rate
        stalled = asyncio.get_running_loop().time() + MAX_STALL  # counted from this wait
        return min(self._deadline, keeping_up, stalled)

    async def _receive(self) -> bytes:
        try:
            async with asyncio.timeout_at(self._next_deadline()):
                data = await self._content.read(_PIECE)
        except TimeoutError:
            # not a TimeoutError: inside a COPY, asyncpg would take that for its own timeout
            raise BodyTimeout from None
        except (ConnectionError, HttpProcessingError, RequestPayloadError) as exc:
            # the client went away or broke the framing; not an OSError either: that would
            # read as the database being away
            raise BodyIncomplete(" ".join(str(exc).split()) or type(exc).__name__) from None
        self.received += len(data)
        return data
