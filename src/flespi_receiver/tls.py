"""Serving HTTPS directly: the TLS context, and what a TLS connection may cost a stranger.

asyncio's TLS (`asyncio.sslproto.SSLProtocol`) gives every accepted connection a read buffer
of 256 KiB, allocated and filled with zeros at accept, before a byte arrives; it waits 60 s for
the handshake and 30 s for the peer's close_notify. So each idle TCP connection to a TLS port
held about 300 KiB for a minute (3000 of them: 900 MB). Served here: the read buffer is
`TLS_READ_BUFFER` (one TLS record's plaintext, 2^14 bytes: RFC 8446 section 5.1), the
handshake must end within `server.header_timeout` seconds, and a closing connection waits
`TLS_CLOSE_WAIT` seconds for the peer's close_notify (RFC 8446 section 6.1: the side that
closes need not wait for it at all; asyncio wants a positive wait). What is left, about 64 KiB
a connection from accept until its headers are complete, is OpenSSL's state and that buffer.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl

from aiohttp import web

from flespi_receiver.config import ServerSettings

TLS_READ_BUFFER = 16 * 1024
TLS_CLOSE_WAIT = 1.0  # seconds


def tls_context(server: ServerSettings) -> ssl.SSLContext | None:
    """The server's TLS context from `tls_cert` and `tls_key` (PEM files), TLS 1.2 or newer;
    None when HTTPS is not served directly. Raises OSError or ssl.SSLError for unreadable
    files."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(server.tls_cert, server.tls_key)
    # asyncio reads the TLS bytes of every connection of the process through a buffer this
    # large (a class attribute, not a parameter): 256 KiB a connection is what a stranger's
    # idle connection cost
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    return context


class ReceiverSite(web.TCPSite):
    """aiohttp's TCPSite with the TLS handshake bounded by `handshake` seconds and the closing
    one by TLS_CLOSE_WAIT; without TLS, the same as TCPSite."""

    __slots__ = ("_handshake",)

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        handshake: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._handshake = handshake

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake,
            ssl_shutdown_timeout=TLS_CLOSE_WAIT,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
