"""The stream endpoint: authorization, body, decoding, storing, and the reply flespi waits for."""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel

from flespi_receiver.body import BodyReader, content_coding
from flespi_receiver.body_slots import BodySlots, Holding
from flespi_receiver.config import StreamSettings
from flespi_receiver.device_state import DEFAULT_EFFECTS, BatchEffects
from flespi_receiver.drain import reply_then_drain
from flespi_receiver.errors import (
    BatchRejected,
    BodyError,
    BodyTimeout,
    BodyTooBusy,
    BodyTooLarge,
    ShutdownTimeout,
    drop_frames,
)
from flespi_receiver.failures import DatabaseState, database_kind
from flespi_receiver.metrics import Metrics
from flespi_receiver.network import (
    Address,
    ClientAddressHeader,
    FailureLimiter,
    Network,
    allowed,
    client_address,
    limiter_key,
)
from flespi_receiver.pooled import PoolLimits, store_pooled
from flespi_receiver.reply_log import reason_of, record_reply
from flespi_receiver.state import ACCEPTING, DATABASE_HEALTH, IN_FLIGHT, POOL, SENDER
from flespi_receiver.store import StoreResult

log = structlog.get_logger("flespi_receiver.ingest")

RETRY_AFTER_SECONDS = "5"
BUG = "internal error; the batch was not stored"
# Bodies larger than this (decoded) are stored while they arrive (a 1000-message batch is ~1 MB)
STREAMED_BODY = 64 * 1024
# a proxy's request id is kept when it looks like one; anything else gets an id of our own
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,64}")


class BatchReply(BaseModel):
    """The JSON body of a 200 reply: what happened to the messages of the batch."""

    stored: int
    duplicates: int
    rejected: int


@dataclass(frozen=True, slots=True)
class Limits:
    """Per body: bytes after decompression, seconds, bytes per second; the memory for bodies in
    flight (slots of max_body_size bytes) and how many bodies one stream may have at once."""

    max_body_size: int
    body_timeout: float
    min_body_rate: int
    body_slots: BodySlots  # server.bodies_in_flight slots
    # at most this many bodies for one stream (bodies_in_flight less one per other stream)
    bodies_per_stream: int = 1


def json_response(status: int, body: dict[str, object], **headers: str) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def error_response(status: int, reason: str, **headers: str) -> web.Response:
    return json_response(status, {"error": reason}, **headers)


def _drained(request: web.Request, status: int, received: int) -> bool:
    """Whether the rest of the body is read and dropped after the reply (drain.py): for a
    stream's sender whose body is not all read, refused for room (503) or mid-way (some of it
    received); not after a 408 (too slow already), nor after a refusal on the headers alone
    (401, 403, 413 by Content-Length, 415, 417: the body is never read)."""
    if SENDER not in request or request.content.is_eof() or status == 408:
        return False
    return status == 503 or received > 0


def _broken(response: web.Response) -> web.Response:
    """A transfer that broke off: the connection is closed after the reply, never reused."""
    response.force_close()
    return response


def authorized(header: str | None, accepted: list[bytes]) -> bool:
    """Constant-time check of the Authorization header against every accepted value."""
    if header is None:
        return False
    given = header.encode("utf-8", errors="surrogateescape")
    matches = [hmac.compare_digest(given, value) for value in accepted]
    return any(matches)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may post at all: server-wide networks, the proxies to believe, failed-auth limits."""

    allowed_networks: list[Network]
    trusted_proxies: list[Network]
    client_address_header: ClientAddressHeader
    limiter: FailureLimiter


def request_id(header: str | None) -> str:
    """The proxy's `X-Request-Id` when it is short and plain, else a new random id."""
    if header is not None and REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex[:16]


class StreamEndpoint:
    """Handles POSTs of one configured stream."""

    def __init__(
        self,
        stream: StreamSettings,
        limits: Limits,
        pool_limits: PoolLimits,
        access: AccessPolicy,
        metrics: Metrics,
        effects: BatchEffects = DEFAULT_EFFECTS,
    ) -> None:
        self.limits = limits
        self.pool_limits = pool_limits
        self.effects = effects
        self.access = access
        self.metrics = metrics
        # this stream's share of the slots for bodies in flight, however many bodies hold
        # them: every other stream keeps one slot
        self.stream_slots = BodySlots(limits.bodies_per_stream)
        self.reload(stream)

    def reload(self, stream: StreamSettings) -> None:
        """Take new credentials and networks (SIGHUP); batches in flight keep the old ones."""
        credentials = [v.get_secret_value().encode("utf-8") for v in stream.authorization]
        # one assignment: a request sees the old settings or the new ones, never a mix
        self.current = (stream, credentials)
        self.fields = stream.message_fields(
            keep_keys=self.effects.device_state and self.effects.merge
        )
        self.removed = False

    def remove(self) -> None:
        """The stream was removed from the configuration (SIGHUP): its path answers 404."""
        self.removed = True

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one batch request; every reply, 500s included, is one `batch` log line."""
        started = time.perf_counter()
        stream, credentials = self.current
        rid = request_id(request.headers.get("X-Request-Id"))
        if self.removed:
            reason = "no stream at this path (removed from the configuration)"
            record_reply(self.metrics, 404, reason=reason, request_id=rid, client=request.remote)
            return _broken(error_response(404, reason, **{"X-Request-Id": rid}))
        access = self.access
        client = client_address(
            request.remote, request.headers, access.trusted_proxies, access.client_address_header
        )
        bound = log.bind(stream=stream.name, request_id=rid, client=str(client))
        failure: Exception | None = None
        try:
            with request.app[IN_FLIGHT].answering(request.content):
                response, result, size = await self._answer(
                    request, stream, credentials, client, bound
                )
        except Exception as exc:  # a bug: still one reply, one log line, one count
            failure = exc
            response, result, size = error_response(500, BUG), None, 0
        if not request.content.is_eof():
            # the rest of the body is still on its way: this connection can't carry another
            response.force_close()
        record_reply(
            self.metrics,
            response.status,
            stream=stream.name,
            reason=reason_of(response),
            duration=time.perf_counter() - started,
            size=size,
            result=result,
            failure=failure,
            request_id=rid,
            client=str(client),
        )
        response.headers["X-Request-Id"] = rid
        if _drained(request, response.status, size):
            # a sender's reply before its body's end: delivered, not lost in a reset
            await reply_then_drain(request, response, self.limits.max_body_size)
        return response

    async def _answer(
        self,
        request: web.Request,
        stream: StreamSettings,
        credentials: list[bytes],
        client: Address | None,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> tuple[web.Response, StoreResult | None, int]:
        if not request.app[ACCEPTING].is_set():
            reply = error_response(503, "receiver is shutting down", **{"Retry-After": "1"})
            reply.force_close()  # the next batch goes to a receiver that is not stopping
            return reply, None, 0
        if not (
            allowed(client, self.access.allowed_networks)
            and allowed(client, list(stream.allowed_networks))
        ):
            return error_response(403, "address not allowed"), None, 0
        if credentials and not authorized(request.headers.get("Authorization"), credentials):
            self.metrics.auth_failures.labels(stream.name).inc()
            # the right credentials always pass; only wrong ones are told to wait
            key = limiter_key(client)
            wait = self.access.limiter.retry_after(key)
            if wait:
                reply = error_response(
                    429, "too many failed authentications", **{"Retry-After": str(wait)}
                )
                return reply, None, 0
            self.access.limiter.failed(key)
            return error_response(401, "missing or wrong Authorization header"), None, 0
        request[SENDER] = stream.name
        coding = content_coding(request.headers.get("Content-Encoding"))
        refusal = self._refuse_headers(request, coding)
        if refusal is not None or coding is None:
            return refusal or self._unsupported(request), None, 0
        expect = request.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            return error_response(417, f"Expect {expect!r} is not supported"), None, 0
        # bodies are held in memory while they arrive and are stored: bound that memory, and
        # how many bodies one stream may have (a leaked token must not stall the other streams)
        timeout = self.pool_limits.acquire_timeout
        slots, stream_slots = self.limits.body_slots, self.stream_slots
        # the body's slots in the stream's share, and the same in the whole
        holding, in_stream = Holding(), Holding()
        try:
            try:
                async with asyncio.timeout(timeout):
                    await stream_slots.take(in_stream, 1)
                    await slots.take(holding, 1)
            except TimeoutError:
                return self._busy(), None, 0
            max_body_size = self.limits.max_body_size
            # one body never takes the slot each other stream keeps
            most = self.limits.bodies_per_stream
            warned = False

            async def make_room(size: int) -> None:
                # what the body holds grew past its slots: take more (see body_slots.py)
                nonlocal warned
                wanted = -(-size // max_body_size)
                if wanted > most:
                    if not warned:
                        warned = True
                        bound.warning(
                            "body needs more memory than one stream's bodies in flight may "
                            "hold; it is stored with that",
                            needed=size,
                            allowed=most * max_body_size,
                        )
                    wanted = most
                try:
                    async with asyncio.timeout(timeout):
                        await stream_slots.take(in_stream, wanted)
                        await slots.take(holding, wanted)
                except TimeoutError:
                    raise BodyTooBusy from None

            return await self._receive_and_store(request, stream, coding, bound, make_room)
        finally:
            slots.release(holding)
            stream_slots.release(in_stream)

    async def _receive_and_store(
        self,
        request: web.Request,
        stream: StreamSettings,
        coding: str,
        bound: structlog.typing.FilteringBoundLogger,
        make_room: Callable[[int], Awaitable[None]],
    ) -> tuple[web.Response, StoreResult | None, int]:
        if request.headers.get("Expect") is not None:
            # everything that could refuse the request has had its say and a slot for the body
            # is free: now the body may come
            try:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except ConnectionError:  # the client went away while it waited
                reply = error_response(400, "body incomplete: the client went away")
                return _broken(reply), None, 0
        limits = self.limits
        reader = BodyReader(
            request.content, coding, limits.max_body_size, limits.body_timeout, limits.min_body_rate
        )
        reader.make_room = make_room
        try:
            # a large body is stored as it arrives; a small one is read whole first. The size
            # that counts is the decoded one: a small gzip or chunked body may be a large one
            large = (request.content_length or 0) > STREAMED_BODY
            if not large:
                large = not await reader.read_some(STREAMED_BODY + 1)
            body = reader if large else await reader.read_all()
            response, result = await self._store(request, stream, body, bound)
        except BodyError as exc:
            drop_frames(exc)  # its traceback would keep the body's chunks alive
            return _broken(self._body_refused(exc)), None, reader.received
        return response, result, reader.received

    def _body_refused(self, exc: BodyError) -> web.Response:
        """The reply to a body that could not be received whole; nothing of it was stored."""
        limits = self.limits
        if isinstance(exc, BodyTimeout):
            return error_response(
                408,
                f"body not received within server.body_timeout ({limits.body_timeout}s) or "
                f"slower than server.min_body_rate ({limits.min_body_rate} bytes/s)",
            )
        if isinstance(exc, BodyTooLarge):
            return self._too_large()
        if isinstance(exc, BodyTooBusy):
            return error_response(
                503,
                "the body needs more memory than one body in flight and there was no room for "
                "it (server.bodies_in_flight slots of server.max_body_size bytes; a large "
                "body, one holding a large message, or one stored message by message); "
                "nothing was stored",
                **{"Retry-After": "1"},
            )
        if isinstance(exc, ShutdownTimeout):
            return error_response(
                503,
                "receiver is shutting down and the body did not arrive within "
                "server.shutdown_timeout; nothing was stored",
                **{"Retry-After": "1"},
            )
        return error_response(400, f"body incomplete or undecodable: {exc}")

    def _refuse_headers(self, request: web.Request, coding: str | None) -> web.Response | None:
        transfer = request.headers.get("Transfer-Encoding", "")
        codings = [c.strip().lower() for c in transfer.split(",") if c.strip()]
        if any(c != "chunked" for c in codings):
            # RFC 9112 6.1: a transfer coding the server does not understand is 501
            return error_response(
                501,
                f"Transfer-Encoding {transfer!r} is not supported; use chunked, and "
                "Content-Encoding for compression",
            )
        length = request.content_length
        if length is not None and length > self.limits.max_body_size:
            return self._too_large()
        return None

    def _unsupported(self, request: web.Request) -> web.Response:
        encoding = request.headers.get("Content-Encoding", "")
        return error_response(
            415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
        )

    def _busy(self) -> web.Response:
        return error_response(
            503,
            "too many bodies in flight (server.bodies_in_flight), retry later",
            **{"Retry-After": RETRY_AFTER_SECONDS},
        )

    def _too_large(self) -> web.Response:
        return error_response(
            413, f"body is larger than server.max_body_size ({self.limits.max_body_size} bytes)"
        )

    async def _store(
        self,
        request: web.Request,
        stream: StreamSettings,
        body: bytes | BodyReader,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> tuple[web.Response, StoreResult | None]:
        quarantine = stream.on_invalid == "quarantine"
        pool, health = request.app[POOL], request.app[DATABASE_HEALTH]
        try:
            result = await store_pooled(
                pool,
                stream.name,
                body,
                self.pool_limits,
                quarantine=quarantine,
                fields=self.fields,
                effects=self.effects,
            )
        except BatchRejected as exc:
            drop_frames(exc)
            return error_response(400 if exc.whole_body else 422, str(exc)), None
        except Exception as exc:
            kind = database_kind(exc)
            cause = exc.cause if isinstance(exc, DatabaseState) else exc
            if kind is None:
                raise  # the body's own errors, or a bug
            drop_frames(exc)
            self.metrics.database_errors.labels(stream.name, kind).inc()
            health.failed(kind)
            bound.warning(
                "database unavailable",
                kind=kind,
                sqlstate=getattr(cause, "sqlstate", None),
                error=f"{type(cause).__name__}: {cause}",
            )
            refusal = error_response(
                503,
                f"database unavailable ({kind}), retry later",
                **{"Retry-After": RETRY_AFTER_SECONDS},
            )
            return refusal, None
        health.stored()
        self.metrics.batch_stored(
            stream.name, result.messages, result.stored, result.duplicates, result.rejected
        )
        reply = BatchReply(
            stored=result.stored, duplicates=result.duplicates, rejected=result.rejected
        )
        return json_response(200, reply.model_dump()), result
