"""One `batch` log line and one `requests_total` count for every reply, whatever answered it.

Stream endpoints, the router (404, 405), and the connection handler (a request aiohttp could
not parse, headers too large or too slow) all answer through `record_reply`, so an operator
sees every refusal the same way. Replies that reached no stream are counted with
`stream=""` (an empty label: PromQL selects them with `{stream=""}`).
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from aiohttp import web

from flespi_receiver.metrics import Metrics
from flespi_receiver.store import StoreResult

log = structlog.get_logger("flespi_receiver.ingest")

NO_STREAM = ""


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
    warning.
    """
    metrics.requests.labels(stream, str(status)).inc()
    if duration is not None and stream:
        metrics.duration.labels(stream).observe(duration)
    bound = log.bind(stream=stream or None, **context)
    event = (
        bound.info
        if status == 200
        else bound.debug
        if status == 429
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
    )
