"""Running the application: listening (plain or TLS), /metrics apart, SIGHUP reloads, shutdown."""

from __future__ import annotations

import asyncio
import resource
import signal
import ssl
from pathlib import Path

import structlog
from aiohttp import web

from flespi_receiver.app import create_app, create_metrics_app
from flespi_receiver.config import (
    Settings,
    load_settings,
    mask_url,
    secret_values,
)
from flespi_receiver.config_diff import settings_needing_restart
from flespi_receiver.connection import HeaderLimits, ReceiverRunner
from flespi_receiver.errors import ConfigError
from flespi_receiver.redact import REDACTOR
from flespi_receiver.state import ACCEPTING, ENDPOINTS, IN_FLIGHT, METRICS
from flespi_receiver.tls import ReceiverSite, tls_context

log = structlog.get_logger("flespi_receiver.server")

# seconds aiohttp gives what is left after the drain (requests that outlived shutdown_timeout)
AFTER_DRAIN = 1.0
# keys a SIGHUP can change; anything else needs a restart
RELOADABLE = (
    "streams[].authorization, streams[].allowed_networks, server.tls_cert/tls_key, streams removed"
)


def raise_file_limit() -> int:
    """Raise the soft limit of open files to the hard one (one per connection); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit some kernels refuse as soft
            pass
    return soft


def _validated(config: Path, current: Settings, context: ssl.SSLContext | None) -> Settings:
    """The new settings, checked completely before anything changes; ConfigError if any part
    can't be applied now (invalid, unsafe file, a setting that needs a restart, TLS files)."""
    new = load_settings(config)
    REDACTOR.add(secret_values(new))
    names = {stream.name for stream in new.streams}
    # a removed stream is applied (it stops accepting); any other change must be reloadable
    kept = current.model_copy(update={"streams": [s for s in current.streams if s.name in names]})
    restart = settings_needing_restart(kept, new)
    if restart:
        raise ConfigError(f"these settings change only on restart: {', '.join(restart)}")
    serves_tls = bool(new.server.tls_cert and new.server.tls_key)
    if serves_tls != (context is not None):
        raise ConfigError(
            "server.tls_cert/tls_key: TLS is turned on or off only by a restart (a reload "
            "replaces the certificate of a server that already serves TLS)"
        )
    if context is not None and new.server.tls_cert and new.server.tls_key:
        try:
            tls_context(new.server)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS files refused: {exc}") from None
    return new


def reload(
    app: web.Application, config: Path, current: Settings, context: ssl.SSLContext | None
) -> Settings:
    """Apply a re-read config all or nothing: credentials, networks, certificates, and streams
    removed; when any part can't be applied, nothing is and the old settings stay."""
    try:
        new = _validated(config, current, context)
    except ConfigError as exc:
        log.error("reload refused: the old configuration stays", error=str(exc))
        return current
    endpoints = app[ENDPOINTS]
    names = {stream.name for stream in new.streams}
    for stream in new.streams:
        endpoints[stream.name].reload(stream)
    # streams removed by this reload (those removed before stay removed, unnamed)
    removed = sorted(n for n, e in endpoints.items() if n not in names and not e.removed)
    for name in removed:
        endpoints[name].remove()
    if context is not None and new.server.tls_cert and new.server.tls_key:
        # new connections get the new certificate; open ones keep theirs
        context.load_cert_chain(new.server.tls_cert, new.server.tls_key)
    log.info("configuration reloaded", reloadable=RELOADABLE, removed_streams=removed)
    return new


async def serve_app(settings: Settings, dsn: str, config: Path) -> None:
    """Serve until SIGTERM or SIGINT, then finish the batches in flight and stop.

    The drain: the listener closes first (new connections are refused, so a proxy moves them
    to another replica); requests still arriving on open keep-alive connections get 503 with
    Retry-After and Connection: close; batches in flight, bodies still arriving included,
    are read to the end and answered, for up to server.shutdown_timeout seconds.
    """
    app = create_app(settings, dsn)
    server = settings.server
    runners: list[web.AppRunner] = [
        ReceiverRunner(
            app,
            header_limits=HeaderLimits(server.max_header_size, server.header_timeout),
            keepalive_timeout=server.keepalive_timeout,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=AFTER_DRAIN,
        )
    ]
    context = tls_context(settings.server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    current = settings

    def on_sighup() -> None:
        nonlocal current
        current = reload(app, config, current, context)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        await runners[0].setup()
        site = ReceiverSite(
            runners[0],
            settings.server.host,
            settings.server.port,
            handshake=settings.server.header_timeout,
            ssl_context=context,
        )
        await site.start()
        if settings.metrics.enabled and settings.metrics.port:
            runners.append(web.AppRunner(create_metrics_app(app[METRICS]), access_log=None))
            await runners[1].setup()
            metrics_site = web.TCPSite(runners[1], settings.metrics.host, settings.metrics.port)
            await metrics_site.start()
            log.info("metrics", address=metrics_site.name)
        log.info(
            "serving",
            address=site.name,
            open_files_limit=raise_file_limit(),
            streams={s.name: s.path for s in settings.streams},
            database=mask_url(dsn),
        )
        await stop.wait()
        app[ACCEPTING].clear()
        # aiohttp's own shutdown stops reading open connections at once, which would leave a
        # body that is still arriving unread: the batches in flight are finished first
        await site.stop()
        log.info("shutting down: finishing batches in flight", in_flight=app[IN_FLIGHT].count)
        in_flight = app[IN_FLIGHT]
        if not await in_flight.wait_idle(settings.server.shutdown_timeout):
            # bodies still arriving get 503 (nothing stored), the rest a little longer to end
            ended = in_flight.end_bodies()
            if not await in_flight.wait_idle(AFTER_DRAIN):
                log.warning(
                    "shutdown_timeout passed with batches in flight; they are dropped unanswered",
                    in_flight=in_flight.count,
                )
            log.info("shutdown_timeout passed: bodies still arriving got 503", bodies=ended)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for runner in runners:
            await runner.cleanup()
    log.info("stopped")
