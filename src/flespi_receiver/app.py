"""The aiohttp application: one POST route per stream, the pool in the app context."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import structlog
from aiohttp import web

from flespi_receiver.body_slots import BodySlots
from flespi_receiver.config import Settings, mask_url
from flespi_receiver.connection import reply_headers
from flespi_receiver.device_state import BatchEffects
from flespi_receiver.failures import DatabaseHealth
from flespi_receiver.health import add_health_routes
from flespi_receiver.ingest import (
    AccessPolicy,
    Limits,
    StreamEndpoint,
    error_response,
    request_id,
)
from flespi_receiver.metrics import Metrics
from flespi_receiver.network import FailureLimiter
from flespi_receiver.partition_peers import announce
from flespi_receiver.partitions import UPKEEP_PATIENCE, maintain
from flespi_receiver.pooled import PoolLimits
from flespi_receiver.reply_log import reason_of, record_reply
from flespi_receiver.state import (
    ACCEPTING,
    DATABASE_HEALTH,
    ENDPOINTS,
    IN_FLIGHT,
    METRICS,
    POOL,
    SCHEMA,
    InFlight,
)
from flespi_receiver.timeouts import bound_session, client_timeout

log = structlog.get_logger("flespi_receiver.app")


PARTITION_UPKEEP_SECONDS = 3600
# after a start, and after an upkeep that could not be done, the next one comes sooner
PARTITION_RETRY_SECONDS = 60

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def connection_settings(settings: Settings) -> dict[str, str]:
    """Session settings for every receiver connection."""
    db = settings.database
    on_off = {True: "on", False: "off"}
    return {
        "application_name": "flespi-receiver",
        "search_path": db.schema_name,
        # a reply of 200 must survive a database crash, whatever the server's default
        "synchronous_commit": "on",
        # the receiver's SQL reads and writes times as ISO text in UTC, whatever the
        # database's or role's defaults (partition bounds, retention arithmetic)
        "DateStyle": "ISO, YMD",
        "IntervalStyle": "postgres",
        "TimeZone": "UTC",
        # the receiver keeps device_state itself: the row trigger for other sessions skips it
        "flespi_receiver.writer": "receiver",
        # read by that trigger, for a session that sets them too (schema/0011_...)
        "flespi_receiver.device_state": on_off[db.device_state],
        "flespi_receiver.device_state_merge": on_off[db.device_state_merge],
        "flespi_receiver.notify_channel": db.notify_channel,
    }


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset between batches: the receiver never changes session state.

    (asyncpg still rolls back an open transaction; skipping its RESET ALL saves a round trip
    per batch.)
    """


class _SessionSetup:
    """Each new connection lets PostgreSQL enforce command_timeout itself (timeouts.py) and
    says which [partitioning] this receiver has (partition_peers.py)."""

    def __init__(self, settings: Settings) -> None:
        self.partitioning = settings.partitioning
        self.command_timeout = settings.database.command_timeout

    async def __call__(self, conn: asyncpg.Connection, /) -> None:
        await bound_session(conn, self.command_timeout)
        await announce(conn, self.partitioning)


def pool_context(settings: Settings, dsn: str) -> Callable[[web.Application], AsyncIterator[None]]:
    async def pool(app: web.Application) -> AsyncIterator[None]:
        db = settings.database
        log.info("connecting", database=mask_url(dsn), pool_size=db.pool_size)
        app[POOL] = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=db.pool_size,
            command_timeout=client_timeout(db.command_timeout),
            server_settings=connection_settings(settings),
            reset=_keep_session,
            init=_SessionSetup(settings),
        )
        app[METRICS].pool.pool = app[POOL]
        try:
            yield
        finally:
            await app[POOL].close()

    return pool


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render errors (404, 405 ... and crashes) as JSON with a reason, never a traceback;
    each is one `batch` line and one count, like a stream's replies."""
    failure: Exception | None = None
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(
            exc.status,
            exc.reason,
            **{k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")},
        )
    except Exception as exc:
        failure = exc
        response = error_response(500, "internal error; the batch was not stored")
    rid = request_id(request.headers.get("X-Request-Id"))
    record_reply(
        request.app[METRICS],
        response.status,
        reason=reason_of(response),
        failure=failure,
        request_id=rid,
        client=request.remote,
        method=request.method,
        path=request.path,
    )
    response.headers["X-Request-Id"] = rid
    # a request that reached no stream (a CONNECT, a wrong path) gets no second one here
    response.force_close()
    return response


def partition_upkeep(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    """Every hour: make the partitions ahead and drop those past retention.

    The first run comes a minute after the start (which may have found the locks taken), and
    a run that could not be done is tried again a minute later.
    """

    async def upkeep(app: web.Application) -> AsyncIterator[None]:
        async def run() -> None:
            delay = PARTITION_RETRY_SECONDS
            while True:
                await asyncio.sleep(delay)
                done = False
                try:
                    async with app[POOL].acquire() as conn:
                        done = await maintain(conn, settings.partitioning, patience=UPKEEP_PATIENCE)
                except Exception:  # no connection now; batches are not affected
                    log.exception("partition upkeep failed")
                delay = PARTITION_UPKEEP_SECONDS if done else PARTITION_RETRY_SECONDS

        task = asyncio.create_task(run()) if settings.partitioning.interval != "none" else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return upkeep


def create_app(settings: Settings, dsn: str) -> web.Application:
    """Build the application; nothing is connected until it starts."""
    app = web.Application(
        client_max_size=settings.server.max_body_size,
        middlewares=[json_errors],
        # bodies are decompressed by body.py, after the credentials were checked
        handler_args={"auto_decompress": False},
    )
    app[ACCEPTING] = asyncio.Event()
    app[ACCEPTING].set()
    app[SCHEMA] = settings.database.schema_name
    app[DATABASE_HEALTH] = DatabaseHealth()
    app[IN_FLIGHT] = InFlight()
    add_health_routes(app)
    app.cleanup_ctx.append(pool_context(settings, dsn))
    app.cleanup_ctx.append(partition_upkeep(settings))
    app.on_response_prepare.append(reply_headers)
    db = settings.database
    pool_limits = PoolLimits(db.acquire_timeout, db.command_timeout)
    server = settings.server
    limits = Limits(
        server.max_body_size,
        server.body_timeout,
        server.min_body_rate,
        BodySlots(server.bodies_in_flight),
        max(1, server.bodies_in_flight - (len(settings.streams) - 1)),
    )
    app[METRICS] = metrics = Metrics()
    access = AccessPolicy(
        allowed_networks=list(server.allowed_networks),
        trusted_proxies=list(server.trusted_proxies),
        client_address_header=server.client_address_header,
        limiter=FailureLimiter(server.auth_failures_per_minute),
    )
    app[ENDPOINTS] = {}
    effects = BatchEffects.from_settings(settings.database)
    for stream in settings.streams:
        if not stream.authorization:
            log.warning("stream accepts anonymous batches", stream=stream.name, path=stream.path)
        endpoint = StreamEndpoint(stream, limits, pool_limits, access, metrics, effects)
        app[ENDPOINTS][stream.name] = endpoint
        app.router.add_post(stream.path, endpoint.handle, expect_handler=defer_expect)
    if settings.metrics.enabled and not settings.metrics.port:
        app.router.add_get("/metrics", metrics_handler)
    return app


async def defer_expect(request: web.Request) -> None:
    """`Expect: 100-continue` is answered by the stream endpoint, once it has checked the
    request (aiohttp would send 100 Continue before any handler runs)."""


async def metrics_handler(request: web.Request) -> web.Response:
    return request.app[METRICS].render()


def create_metrics_app(metrics: Metrics) -> web.Application:
    """/metrics on a host and port of its own ([metrics] port set)."""
    app = web.Application()
    app.on_response_prepare.append(reply_headers)
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_handler)
    return app
