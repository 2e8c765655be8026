"""One `batch` log line and one `requests_total` count for every reply, whatever answered it.

Stream endpoints, the router (404, 405), and the connection handler (a request aiohttp could
not parse, headers too large or too slow) all answer through `record_reply`, so an operator
sees every refusal the same way. Replies that reached no stream are counted with
`stream=""` (an empty label: PromQL selects them with `{stream=""}`).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import structlog
from aiohttp import web

from flespi_receiver.metrics import Metrics
from flespi_receiver.store import StoreResult

log = structlog.get_logger("flespi_receiver.ingest")

NO_STREAM = ""
# warning lines a minute for replies that reached no stream; the rest are debug lines
OUTSIDE_STREAMS_PER_MINUTE = 60


class _LineBudget:
    """At most `per_minute` lines in each minute; how many were refused since the last one
    allowed."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._minute = -1
        self._used = 0
        self.refused = 0

    def take(self) -> bool:
        minute = int(time.monotonic() // 60)
        if minute != self._minute:
            self._minute, self._used = minute, 0
        if self._used >= self.per_minute:
            self.refused += 1
            return False
        self._used += 1
        return True


_OUTSIDE_STREAMS = _LineBudget(OUTSIDE_STREAMS_PER_MINUTE)


def reason_of(response: web.StreamResponse) -> str:
    """The `error` of a JSON error reply, else ""."""
    body = getattr(response, "body", None)
    if isinstance(body, bytes) and body.startswith(b"{"):
        try:
            return str(orjson.loads(body).get("error", ""))
        except orjson.JSONDecodeError:
            return ""
    return ""


def record_reply(
    metrics: Metrics,
    status: int,
    *,
    stream: str = NO_STREAM,
    reason: str = "",
    duration: float | None = None,
    size: int = 0,
    result: StoreResult | None = None,
    failure: BaseException | None = None,
    **context: Any,
) -> None:
    """Count the reply in `requests_total{stream,status}` and write its `batch` line.

    `duration` (seconds) is observed in the request duration histogram of a stream; `size` is
    the body's bytes as sent; `context` adds fields such as `request_id` and `client`.
    200 is info, 429 debug (a stranger's guessing must not fill the disk), 500 error, the rest
    warning; replies that reached no stream (404, 400, 431...: anyone can cause them) are
    warnings up to `OUTSIDE_STREAMS_PER_MINUTE` a minute, debug beyond (counted all the same),
    and the next warning says how many were not.
    """
    metrics.requests.labels(stream, str(status)).inc()
    if duration is not None and stream:
        metrics.duration.labels(stream).observe(duration)
    bound = log.bind(stream=stream or None, **context)
    quiet = status == 429 or (not stream and not _OUTSIDE_STREAMS.take())
    event = (
        bound.info
        if status == 200
        else bound.debug
        if quiet
        else bound.error
        if status >= 500 and status != 503
        else bound.warning
    )
    event(
        "batch",
        status=status,
        bytes=size,
        messages=result.messages if result else None,
        stored=result.stored if result else 0,
        duplicates=result.duplicates if result else 0,
        rejected=result.rejected if result else 0,
        # how the batch was stored: insert, copy, streamed (COPY as it arrived) or careful
        **({"path": result.path} if result else {}),
        **({"duration_ms": round(duration * 1000, 2)} if duration is not None else {}),
        **({"reason": reason} if status != 200 else {}),
        **({"exc_info": failure} if failure is not None else {}),
        **_not_logged(stream, quiet),
    )


def _not_logged(stream: str, quiet: bool) -> dict[str, int]:
    """On a warning line for a reply that reached no stream: how many such replies before it
    were debug lines only (over OUTSIDE_STREAMS_PER_MINUTE)."""
    if stream or quiet or not _OUTSIDE_STREAMS.refused:
        return {}
    refused, _OUTSIDE_STREAMS.refused = _OUTSIDE_STREAMS.refused, 0
    return {"not_logged_before": refused}
