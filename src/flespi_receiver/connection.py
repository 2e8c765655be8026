"""HTTP connections that cost a stranger's sender, not the receiver: header limits and timeouts.

aiohttp limits each header line but not the headers as a whole, has no time limit for them,
keeps idle connections for an hour and reads (and decompresses) a refused body for up to 10 s
after the reply. The runner built here closes all of those doors:

- the request line and headers together may take at most `max_header_size` bytes (else 431)
  and must arrive within `header_timeout` seconds of the connection's start, or of the first
  byte of a following request on a kept-alive connection (else 408); either way the
  connection is closed;
- an idle kept-alive connection is closed after `keepalive_timeout` seconds;
- a reply sent without reading the whole body (401, 403, 413, 415, 429, 408 ...) closes the
  connection at once: the rest of the body is never read (no lingering close);
- the `Server` header says `flespi-receiver`, without versions (`reply_headers`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from flespi_receiver.header_gate import (
    SERVER_NAME,
    HeaderGate,
    headers_too_large,
    headers_too_slow,
    record_refusal,
    send_refusal,
)
from flespi_receiver.metrics import Metrics
from flespi_receiver.state import METRICS, SENDER


@dataclass(frozen=True, slots=True)
class HeaderLimits:
    """Bytes and seconds the request line and headers of one request may take."""

    max_size: int
    timeout: float


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with a byte budget and a deadline for the headers."""

    def __init__(
        self,
        manager: web.Server,
        *,
        header_limits: HeaderLimits,
        metrics: Metrics,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_limits = header_limits
        self._metrics = metrics
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._client_done = False  # the client closed its sending side (half-close)
        self._header_tail = b""  # the last bytes counted, to see a blank line cut in two
        # bytes received, and bytes that made up the requests answered: what is left over is a
        # next request sent before the reply (pipelined), held by the parser
        self._received = 0
        self._consumed = 0
        self._request_header_bytes = 0
        self._current_header_bytes = 0
        self._empty_lines = 0  # skipped before the request line (_skip_empty_lines)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio's signature
        """The client closed its sending side. With a request under way, the transport stays
        open for the reply (a body not complete by now never will be: 400); idle, it closes."""
        if self._awaiting_headers:  # idle, or headers that will never be complete
            return None
        self._client_done = True
        if self._current_request is not None:
            _cut_short(self._current_request)
        if self.transport is not None and self.transport.get_extra_info("ssl_object"):
            return None  # TLS can't stay half-open: asyncio closes it (and warned for True)
        return True

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._awaiting_headers and not self._header_bytes:
            data = self._skip_empty_lines(data)
            if not data:
                return
        if self._awaiting_headers and self._over_header_budget(data):
            self._refuse_large_headers()
            return  # never parsed, never served
        if not self._awaiting_headers and self._pipelined() > self._header_limits.max_size:
            # a next request too large already: not parsed (nor held); once the current one
            # is answered, it gets its 431 (_next_request)
            return
        requests_before = self._request_count
        super().data_received(data)
        if not self._awaiting_headers:
            return
        if self._request_count != requests_before:  # the headers are complete
            self._awaiting_headers = False
            self._disarm_header_timer()
            self._header_tail = b""
            self._request_header_bytes = self._header_bytes
            return
        if data and self._header_timer is None:
            self._arm_header_timer()

    def _skip_empty_lines(self, data: bytes) -> bytes:
        """`data` without the empty lines before a request line, which are skipped (RFC 9112
        section 2.2) before the parser sees them: they are the request's bytes all the same,
        within max_header_size and header_timeout."""
        rest = data.lstrip(b"\r\n")
        skipped = len(data) - len(rest)
        if not skipped:
            return data
        self._consumed += skipped  # not given to the parser: not part of what it holds
        self._empty_lines += skipped
        if self._empty_lines > self._header_limits.max_size:
            self._refuse_large_headers()
            return b""
        if self._header_timer is None:
            self._arm_header_timer()
        return rest

    def _over_header_budget(self, data: bytes) -> bool:
        """Count the bytes of `data` up to the end of the headers (the blank line), as sent:
        whitespace and the chunk that also brings the body's start count too."""
        seen = self._header_tail + data
        end = seen.find(b"\r\n\r\n")
        if end == -1:
            self._header_bytes += len(data)
            self._header_tail = seen[-3:]
        else:
            self._header_bytes += end + 4 - len(self._header_tail)
        return self._header_bytes + self._empty_lines > self._header_limits.max_size

    async def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        if self._client_done:  # the client closed its side before this request was taken up
            _cut_short(request)
        # a pipelined request's headers came with the one before: counted by their size here
        header_bytes = self._request_header_bytes or _header_size(request)
        self._request_header_bytes = 0
        self._current_header_bytes = header_bytes
        self._awaiting_headers = False
        self._disarm_header_timer()
        if _header_size(request) > self._header_limits.max_size:
            # headers that came in one piece with the body's start were not counted as they
            # arrived: the request's own headers are measured before it is served
            request_handler = self._headers_too_large
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            # the next request on this connection gets its own budget; its clock starts with
            # its first byte (until then the keep-alive timeout applies). A body left unread
            # closes the connection instead (no lingering), so there is no next request.
            if request.content.at_eof():
                self._next_request(request, header_bytes)

    def _pipelined(self) -> int:
        """Bytes received beyond the current request (its headers and declared body)."""
        request = self._current_request
        if request is None or request.content_length is None:
            return 0  # not known yet, or a chunked body: counted once the request is answered
        used = self._consumed + self._current_header_bytes + request.content_length
        return self._received - used

    def _next_request(self, request: BaseRequest, header_bytes: int) -> None:
        """The request was answered with its body read: the next one gets its own budget and
        clock. Bytes of it that came already (pipelined) count, and start its clock."""
        if request.content_length is None and request.body_exists:
            self.force_close()  # chunked: what was the body's is not known, no next request
            return
        self._consumed += header_bytes + (request.content_length or 0)
        self._empty_lines = 0
        self._awaiting_headers = True
        self._header_bytes = max(0, self._received - self._consumed)
        self._header_tail = b""
        if self._header_bytes > self._header_limits.max_size:
            self._refuse_large_headers()
        elif self._header_bytes:
            self._arm_header_timer()

    def _refuse_large_headers(self) -> None:
        self._refuse(431, headers_too_large(self._header_limits.max_size))

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (400) or serve: a JSON reply and one `batch` line.

        The parser's message is not repeated: it quotes the offending bytes, which may hold a
        token; the exception's class says what was wrong.
        """
        if request.writer.output_size > 0:  # a reply was started: the connection is broken
            raise ConnectionError("a reply was already started")
        if isinstance(exc, LineTooLong) or "too many headers" in str(exc).lower():
            status = 431  # a header line past max_header_size (or 8190), or over 100 lines
        kind = type(exc).__name__ if exc is not None else HTTPStatus(status).phrase
        reason = f"malformed HTTP request ({kind})" if status == 400 else kind
        return self._closing_reply(status, reason)

    async def _headers_too_large(self, request: BaseRequest) -> web.StreamResponse:
        return self._closing_reply(431, headers_too_large(self._header_limits.max_size))

    def _closing_reply(self, status: int, reason: str) -> web.Response:
        """A JSON reply made here, counted and logged, after which the connection closes."""
        rid = self._record(status, reason)
        response = web.Response(
            status=status,
            body=orjson.dumps({"error": reason}),
            content_type="application/json",
            headers={"Server": SERVER_NAME, "Connection": "close", "X-Request-Id": rid},
        )
        response.force_close()
        return response

    def _record(self, status: int, reason: str) -> str:
        """One `batch` line and one count for a reply made here; returns its request id."""
        return record_refusal(self._metrics, self.transport, status, reason)

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(
            self._header_limits.timeout, self._headers_too_slow
        )

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._awaiting_headers:
            self._refuse(408, headers_too_slow(self._header_limits.timeout))

    def _refuse(self, status: int, error: str) -> None:
        self._disarm_header_timer()
        self._awaiting_headers = False
        if self.transport is not None:
            send_refusal(self._metrics, self.transport, status, error)
        self.force_close()  # the transport sends what was written, then closes


def _header_size(request: BaseRequest) -> int:
    """Bytes of the request line and headers as sent (names, values, separators, CRLFs)."""
    line = len(request.method) + len(request.raw_path) + 12  # " HTTP/1.1\r\n" and a space
    return line + sum(len(name) + len(value) + 4 for name, value in request.raw_headers)


def _cut_short(request: BaseRequest) -> None:
    """A body still expected after the client's end of sending can't be complete any more."""
    if not request.content.is_eof():
        request._cancel(ConnectionResetError("the client closed its side before the body's end"))


class GuardedServer(web.Server):
    """A `web.Server` whose connections are `GuardedRequestHandler`s."""

    def __init__(self, template: web.Server, header_limits: HeaderLimits, metrics: Metrics) -> None:
        # the same handler, request factory and keyword arguments as the server aiohttp made
        kwargs: dict[str, Any] = dict(template._kwargs)
        super().__init__(
            template.request_handler,
            request_factory=template.request_factory,
            handler_cancellation=template.handler_cancellation,
            loop=template._loop,
            **kwargs,
        )
        self._header_limits = header_limits
        self._metrics = metrics

        self._gates: set[HeaderGate] = set()

    def __call__(self) -> HeaderGate:  # type: ignore[override]  # a gate, then a handler
        """A new connection: a `HeaderGate` until its headers are complete."""
        return HeaderGate(
            self._handler,
            self._gates,
            max_size=self._header_limits.max_size,
            timeout=self._header_limits.timeout,
            metrics=self._metrics,
        )

    def pre_shutdown(self) -> None:
        for gate in list(self._gates):
            gate.close()
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109  # aiohttp's
        for gate in list(self._gates):
            gate.close()
        await super().shutdown(timeout)

    def _handler(self) -> RequestHandler:
        return GuardedRequestHandler(
            self,
            loop=self._loop,
            header_limits=self._header_limits,
            metrics=self._metrics,
            **self._kwargs,
        )


class ReceiverRunner(web.AppRunner):
    """An AppRunner serving through `GuardedServer` with the receiver's connection limits."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_limits: HeaderLimits,
        keepalive_timeout: float,
        **kwargs: Any,
    ) -> None:
        line = min(header_limits.max_size, 8190)
        super().__init__(
            app,
            keepalive_timeout=keepalive_timeout,
            # a body not read by the handler is not read at all: the connection closes
            lingering_time=0,
            max_line_size=line,
            max_field_size=line,
            max_headers=100,
            **kwargs,
        )
        self._header_limits = header_limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return GuardedServer(server, self._header_limits, self.app[METRICS])


async def reply_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: `Server` without versions; `Connection: close` when the body was
    not read or was chunked (the connection closes, so the client should not wait to reuse
    it), and after every request that did not carry a stream's credentials: only a stream's
    sender keeps a connection open between requests (a stranger's idle connection would hold
    a request handler)."""
    response.headers["Server"] = SERVER_NAME
    unread = request.body_exists and not request.content.at_eof()
    # after a chunked body the next request's bytes can't be told from the body's on the
    # wire, so its header budget could not be counted: the connection closes (_next_request)
    chunked = request.body_exists and request.content_length is None
    if unread or chunked or SENDER not in request:
        response.force_close()
        response.headers["Connection"] = "close"  # the hook runs after aiohttp wrote its own
