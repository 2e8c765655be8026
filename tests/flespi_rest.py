"""A local stand-in for flespi's REST API (device list and device messages), on 127.0.0.1.

It follows the contract flespi documents (see flespi_receiver/flespi_api.py): `FlespiToken`
authorization (401 otherwise, with flespi's error body), `data={"from","to","count"}` with
`from`/`to` inclusive on `timestamp`, oldest first, at most `count` messages, the page in
`result`. Faults are real HTTP replies queued by a test: a 429 with Retry-After, a 5xx, a
page that takes longer than the client waits, a page that never comes. Messages are written
the way another encoder would: keys in another order, non-ASCII and `/` escaped, spaces,
floats with a trailing zero and integral floats as exponents.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN = "flespi-test-token-9f2c"


def respell(value: Any) -> str:
    """The same JSON value, spelled differently from orjson's compact output."""
    if isinstance(value, dict):
        items = sorted(value.items(), reverse=True)
        return "{" + ", ".join(f"{respell(k)}: {respell(v)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[ " + " , ".join(respell(v) for v in value) + " ]"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        if value.is_integer() and math.isfinite(value):
            return f"{value:.6e}"  # 100.0 as 1.000000e+02
        text = repr(value)
        return text if "e" in text else text + "0"  # 49.06978 as 49.069780
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=True).replace("/", "\\/")


@dataclass
class FlespiRest:
    """The server's state: devices' messages, queued faults, and what it was asked."""

    messages: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # per messages request, in order: None = answer; an int = that status; "slow" = answer
    # after `slow_seconds`; "hang" = never answer (until the test goes on); "echo" = a 500
    # whose reason quotes the token; "errors" = a 200 with an errors list
    faults: list[int | str | None] = field(default_factory=list)
    slow_seconds: float = 3.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def add(self, device_id: int, message: dict[str, Any]) -> None:
        self.messages.setdefault(device_id, []).append(message)
        self.messages[device_id].sort(key=lambda m: m["timestamp"])

    def _authorized(self, request: web.Request) -> bool:
        self.authorizations.append(request.headers.get("Authorization", ""))
        return request.headers.get("Authorization") == f"FlespiToken {TOKEN}"

    async def devices(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "Unauthorized")
        selector = request.match_info["selector"]
        ids = sorted(self.messages) if selector == "all" else [int(i) for i in selector.split(",")]
        return _result([{"id": i} for i in ids if i in self.messages])

    async def device_messages(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return _error(401, "Unauthorized")
        data = json.loads(request.query["data"])
        self.requests.append({"device": int(request.match_info["device"]), **data})
        fault = self.faults.pop(0) if self.faults else None
        if fault == "hang":
            self.hanging.set()
            await asyncio.sleep(3600)
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        if fault == 429:
            return _error(429, "Too Many Requests", {"Retry-After": "1"})
        if fault == "errors":  # a 200 that carries errors instead of messages
            return web.json_response({"errors": [{"code": 7, "reason": "storage error"}]})
        if fault == 403:  # a token that may list the devices but not read their messages
            return _error(403, "Forbidden")
        if fault == "echo":  # a careless error page that quotes the request's token
            return _error(500, f"internal error for {request.headers['Authorization']}")
        if isinstance(fault, int):
            return _error(fault, "Service Unavailable")
        stored = self.messages.get(int(request.match_info["device"]), [])
        page = [m for m in stored if data["from"] <= m["timestamp"] <= data["to"]]
        page = page[: data["count"]]
        body = '{"result": [' + ", ".join(respell(m) for m in page) + "]}"
        return web.Response(body=body.encode(), content_type="application/json")


def _result(items: list[dict[str, Any]]) -> web.Response:
    return web.json_response({"result": items})


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"errors": [{"code": status, "reason": reason}]}
    return web.json_response(body, status=status, headers=headers)


@asynccontextmanager
async def flespi_rest(state: FlespiRest) -> AsyncIterator[FlespiRest]:
    app = web.Application()
    app.router.add_get("/gw/devices/{device:\\d+}/messages", state.device_messages)
    app.router.add_get("/gw/devices/{selector}", state.devices)
    # a page left hanging must not hold the test up at the end
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()
