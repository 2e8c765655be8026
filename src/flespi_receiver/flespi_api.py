"""A client for the two calls of flespi's REST API that a backfill needs, with bounded retries.

What it relies on, from flespi's public documentation:

* every request carries `Authorization: FlespiToken <token>`; a bad or expired token gets 401,
  a token without the right gets 403 (flespi.com/kb/flespi-api-basics; the "Error Codes"
  table of flespi's own skills/flespi/SKILL.md, flespi-software/skills);
* `GET /gw/devices/{selector}?fields=id` lists the devices a selector names (`all`, `1,2,3`,
  `configuration.ident=...`), in `result` (flespi.com/rest-api, "Selectors" in SKILL.md);
* `GET /gw/devices/{selector}/messages?data={"from":..,"to":..,"count":..}` returns a
  device's stored messages in `result`, ordered by `timestamp`; `from`/`to` are Unix seconds
  and bound `timestamp` inclusively; messages have no limit/offset paging: the next page
  starts at the `timestamp` of the last message ("Pagination" in SKILL.md;
  flespi.io/docs/#/gw/devices/get_devices_dev_selector_messages);
* errors come as `{"errors": [{"code": .., "reason": ".."}]}`; 429 means the rate limit was hit.

The token is held privately: it is never part of a repr, an error message or a log line.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
import orjson
import structlog

from flespi_receiver.errors import ReceiverError
from flespi_receiver.redact import MASK

log = structlog.get_logger("flespi_receiver.flespi_api")

DEFAULT_API_URL = "https://flespi.io"
# a wait asked for by Retry-After longer than this is cut to it; without the header, waits
# double from BACKOFF_START up to BACKOFF_MAX
RETRY_AFTER_MAX = 120.0
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
ATTEMPTS = 8


class FlespiTokenRefused(ReceiverError):
    """flespi refused the token: wrong, expired, or without access to these devices."""

    exit_code = 2


class FlespiRequestRefused(ReceiverError):
    """flespi refused the request itself (400, 404): a selector or time range it rejects."""

    exit_code = 2


class FlespiUnavailable(ReceiverError):
    """flespi did not answer usably after every retry; running again resumes."""


class _Envelope(msgspec.Struct):
    result: msgspec.Raw = msgspec.Raw(b"[]")
    errors: list[Any] | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = ATTEMPTS
    backoff_start: float = BACKOFF_START
    backoff_max: float = BACKOFF_MAX
    retry_after_max: float = RETRY_AFTER_MAX
    timeout: float = 60.0  # seconds for one request, reply included


@dataclass(slots=True)
class FlespiApi:
    """flespi's REST API at `api_url`, authorized by `token`."""

    api_url: str
    token: str = field(repr=False)
    session: aiohttp.ClientSession
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    # called before each wait: (reason, seconds); the command line shows it
    on_retry: Callable[[str, float], None] | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def device_ids(self, selector: str) -> list[int]:
        """The ids of the devices `selector` names, in increasing order."""
        result = await self._get(f"/gw/devices/{quote(selector, safe=',=*')}", {"fields": "id"})
        items = orjson.loads(result)
        return sorted(int(item["id"]) for item in items)

    async def device_messages(self, device_id: int, start: float, end: float, count: int) -> bytes:
        """Up to `count` messages of one device with `start <= timestamp <= end`, oldest
        first: the JSON array text of `result`, exactly as flespi sent it."""
        data = {"from": _seconds(start), "to": _seconds(end), "count": count}
        return await self._get(
            f"/gw/devices/{device_id}/messages", {"data": orjson.dumps(data).decode()}
        )

    def _result(self, body: bytes) -> tuple[bytes | None, str]:
        """The array text of `result` in a 200 reply, or None and why it is not usable: an
        `errors` list (tried again, like a 5xx) or a body that is not flespi's JSON (refused:
        FlespiRequestRefused, a proxy's page?). Anything quoted has the token masked."""
        try:
            envelope = _ENVELOPE.decode(body)
        except msgspec.DecodeError:
            page = body.decode("utf-8", "replace").replace(self.token, MASK)[:200]
            raise FlespiRequestRefused(
                f"the API answered 200 with something that is not flespi's JSON ({page!r}...); "
                "check --api-url"
            ) from None
        if envelope.errors:
            reason = orjson.dumps(envelope.errors).decode().replace(self.token, MASK)[:500]
            return None, f"HTTP 200 with errors: {reason}"
        result = bytes(envelope.result)
        if not result.lstrip().startswith(b"["):
            return None, "HTTP 200 whose result is not a list"
        return result, ""

    async def _get(self, path: str, query: dict[str, str]) -> bytes:
        """The text of the JSON array in `result` of a GET; retried, or an error (see above)."""
        url = self.api_url.rstrip("/") + path
        headers = {"Authorization": f"FlespiToken {self.token}", "Accept": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self.policy.timeout)
        wait = self.policy.backoff_start
        for attempt in range(1, self.policy.attempts + 1):
            reason: str
            delay: float | None = None
            try:
                async with self.session.get(
                    url, params=query, headers=headers, timeout=timeout
                ) as reply:
                    body = await reply.read()
                    if reply.status == 200:
                        result, trouble = self._result(body)
                        if result is not None:
                            return result
                    # an error page may quote the token: it is masked wherever it is shown
                    reason = (
                        trouble
                        if reply.status == 200
                        else f"HTTP {reply.status}{_flespi_reason(body)}".replace(self.token, MASK)
                    )
                    if reply.status in (401, 403):
                        raise FlespiTokenRefused(
                            f"flespi refused the token ({reason}); check the token file or "
                            "$FLESPI_TOKEN, and that the token may read these devices' messages"
                        )
                    if reply.status == 429:
                        delay = _retry_after(reply.headers.get("Retry-After"))
                    elif reply.status < 500 and reply.status != 200:
                        raise FlespiRequestRefused(f"flespi refused GET {path}: {reason}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                reason = reason.replace(self.token, MASK)
            if attempt == self.policy.attempts:
                raise FlespiUnavailable(
                    f"GET {path} failed {attempt} times, last: {reason}; run again to resume"
                )
            if delay is None:
                delay = wait * (0.5 + random.random() / 2)  # noqa: S311 (jitter, not secrecy)
                wait = min(wait * 2, self.policy.backoff_max)
            delay = min(delay, self.policy.retry_after_max)
            log.warning("flespi request retried", path=path, reason=reason, wait=round(delay, 2))
            if self.on_retry is not None:
                self.on_retry(reason, delay)
            await self.sleep(delay)
        raise AssertionError("unreachable")


def _seconds(value: float) -> int | float:
    """Whole seconds as an integer (as flespi's examples write them), else as they are."""
    return int(value) if float(value).is_integer() else value


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by flespi: treated as absent)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _flespi_reason(body: bytes) -> str:
    """`: <reason>` from flespi's error body, when it has one."""
    try:
        errors: Any = orjson.loads(body).get("errors")
        return f": {errors[0]['reason']}" if errors else ""
    except (orjson.JSONDecodeError, AttributeError, LookupError, TypeError):
        return ""
