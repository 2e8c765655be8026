"""A new connection costs its bytes, not a request handler, until its headers are complete.

aiohttp gives every accepted connection a request handler, an HTTP parser, a task and a timer
(about 6 KiB), and its parser keeps each header line received as Python objects (about 430
bytes a line, up to 100 lines), however long the headers take to come. A `HeaderGate` is the
connection's first protocol instead: it holds what arrives as one `bytearray`, within
`max_header_size` bytes and `header_timeout` seconds, and hands the connection and those bytes
to the request handler only once the blank line that ends the headers is there. A sender that
never finishes its headers costs the gate, its socket and transport (about 2 KiB) and the
bytes it sent; it gets 431 when they pass the limit and 408 when the time is up, and the
connection closes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from http import HTTPStatus

import orjson

from flespi_receiver.metrics import Metrics
from flespi_receiver.reply_log import record_reply

SERVER_NAME = "flespi-receiver"

# HTTP ends the headers with an empty line (RFC 9112 section 2.1); a bare LF is handed over
# too, so that the parser answers it (400) rather than the clock
_ENDS = (b"\r\n\r\n", b"\n\n", b"\n\r\n")


def raw_reply(status: int, reason: str, error: str, rid: str) -> bytes:
    """A complete HTTP/1.1 reply with a JSON `{"error": ...}` body, closing the connection."""
    body = orjson.dumps({"error": error})
    return (
        f"HTTP/1.1 {status} {reason}\r\nServer: {SERVER_NAME}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-Id: {rid}\r\n\r\n"
    ).encode() + body


def record_refusal(
    metrics: Metrics, transport: asyncio.BaseTransport | None, status: int, error: str
) -> str:
    """One `batch` line and one count for a reply made outside aiohttp; returns its request id."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    rid = uuid.uuid4().hex[:16]
    record_reply(
        metrics,
        status,
        reason=error,
        request_id=rid,
        client=peer[0] if isinstance(peer, tuple) else None,
    )
    return rid


def send_refusal(
    metrics: Metrics, transport: asyncio.WriteTransport, status: int, error: str
) -> None:
    """Record a refusal made outside aiohttp (`record_refusal`) and write its reply
    (`raw_reply`); the caller closes the connection."""
    rid = record_refusal(metrics, transport, status, error)
    transport.write(raw_reply(status, HTTPStatus(status).phrase, error, rid))


def headers_too_large(max_size: int) -> str:
    """The reason of a 431 for headers over `max_size` bytes."""
    return f"request headers are larger than {max_size} bytes"


def headers_too_slow(timeout: float) -> str:
    """The reason of a 408 for headers not complete within `timeout` seconds."""
    return f"request headers not received within {timeout}s"


def headers_end(data: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the blank line ending the headers in `data`, or -1 when not there yet."""
    found = [(at, len(end)) for end in _ENDS if (at := data.find(end, start)) != -1]
    if not found:
        return -1
    at, size = min(found)
    return at + size


class HeaderGate(asyncio.Protocol):
    """A connection's protocol until its first request's headers are complete.

    `hand_over` makes the request handler (an `asyncio.Protocol`) that takes the connection
    and every byte received so far; `gates` is the set of open gates, closed at shutdown.
    """

    __slots__ = (
        "_data",
        "_gates",
        "_hand_over",
        "_max_size",
        "_metrics",
        "_skipped",
        "_timer",
        "_transport",
    )

    def __init__(
        self,
        hand_over: Callable[[], asyncio.Protocol],
        gates: set[HeaderGate],
        *,
        max_size: int,
        timeout: float,
        metrics: Metrics,
    ) -> None:
        self._hand_over = hand_over
        self._gates = gates
        self._max_size = max_size
        self._metrics = metrics
        self._transport: asyncio.Transport | None = None
        self._data = bytearray()
        self._skipped = 0  # bytes of empty lines before the request line
        self._timer = asyncio.get_running_loop().call_later(timeout, self._too_slow, timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._gates.add(self)

    def data_received(self, data: bytes) -> None:
        if not self._data:
            # empty lines before the request line are skipped (RFC 9112 section 2.2), never
            # handed over, and count within max_header_size
            rest = data.lstrip(b"\r\n")
            self._skipped += len(data) - len(rest)
            data = rest
        seen = len(self._data)
        self._data += data
        end = headers_end(self._data, max(0, seen - 3))
        room = self._max_size - self._skipped
        if end == -1 and len(self._data) <= room:
            return
        if end == -1 or end > room:
            self._refuse(431, headers_too_large(self._max_size))
            return
        self._open()

    def eof_received(self) -> bool | None:
        """The client closed its sending side before its headers were complete: nothing to
        answer; the transport closes."""
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._timer.cancel()
        self._gates.discard(self)
        self._data = bytearray()

    def close(self) -> None:
        """Close the connection (the receiver is stopping)."""
        if self._transport is not None:
            self._transport.close()

    def _open(self) -> None:
        """The headers are complete: the request handler takes the connection and its bytes."""
        self._timer.cancel()
        self._gates.discard(self)
        transport = self._transport
        assert transport is not None
        data, self._data = bytes(self._data), bytearray()
        handler = self._hand_over()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(data)

    def _too_slow(self, timeout: float) -> None:
        self._refuse(408, headers_too_slow(timeout))

    def _refuse(self, status: int, error: str) -> None:
        self._timer.cancel()
        self._data = bytearray()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        send_refusal(self._metrics, transport, status, error)
        transport.close()  # after what was written is sent
