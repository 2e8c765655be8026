"""structlog configuration: JSON lines in production, readable console output on a terminal.

Every line the process writes to stderr goes through here, the standard library's loggers
(aiohttp, asyncio) included, so the JSON log holds one object per line and nothing else; an
exception is a structured `exception` field (type, message, frames without local values),
never a multi-line traceback.
"""

from __future__ import annotations

import logging
import sys

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

from flespi_receiver.config import LogSettings
from flespi_receiver.redact import REDACTOR

# frames kept of a traceback: enough to find the cause, bounded so one line stays readable
MAX_FRAMES = 30


def _json(obj: object, **_: object) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(settings: LogSettings) -> None:
    """Set up structlog and the standard library's logging once, at process start."""
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    rendering: list[structlog.types.Processor]
    if as_json:
        # locals off: they would put payloads and credentials into the log
        transformer = ExceptionDictTransformer(show_locals=False, max_frames=MAX_FRAMES)
        rendering = [
            structlog.processors.ExceptionRenderer(transformer),
            REDACTOR,  # after the exception became text: it may quote a token
            structlog.processors.JSONRenderer(serializer=_json),
        ]
    else:
        rendering = [
            structlog.processors.format_exc_info,
            REDACTOR,
            structlog.dev.ConsoleRenderer(),
        ]
    level = logging.getLevelNamesMapping()[settings.level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *rendering,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
