"""structlog configuration: JSON lines in production, readable console output on a terminal."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

from flespi_receiver.config import LogSettings


def configure_logging(settings: LogSettings) -> None:
    """Set up structlog once, at process start."""
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer(
            serializer=lambda obj, **_: orjson.dumps(obj, default=str).decode()
        )
        if as_json
        else structlog.dev.ConsoleRenderer()
    )
    level = logging.getLevelNamesMapping()[settings.level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
