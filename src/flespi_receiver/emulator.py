"""A stream emulator that behaves like flespi: one sender, the next batch only after a 200.

Anything but 200 (or a dropped connection, or a timeout) makes it send the same batch again.
It can also re-send batches that were already acknowledged, with other boundaries, the way a
reply lost on the way back makes flespi do. Used by the tests, the benchmark and
`flespi-receiver emulate URL` for load-testing a deployment.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


def sample_message(number: int, rng: random.Random) -> dict[str, Any]:
    """A realistic message: ~45 dotted parameters, ~0.9 KB, arrays, objects, non-ASCII, nulls."""
    second = 1764000000 + number
    return {
        "ident": f"35{number % 5000:013d}",
        "timestamp": second + rng.randrange(1_000_000) / 1e6,
        "server.timestamp": second + 0.75,
        "channel.id": 1234,
        "device.id": 5_000_000 + number % 5000,
        "device.name": f"Грузовик №{number % 5000}",
        "device.type.id": 745,
        "protocol.id": 14,
        "peer": "185.213.2.17:42311",
        "position.latitude": round(54.0 + rng.random(), 6),
        "position.longitude": round(25.0 + rng.random(), 6),
        "position.altitude": round(rng.uniform(90, 200), 1),
        "position.speed": rng.randrange(0, 120),
        "position.direction": rng.randrange(360),
        "position.satellites": rng.randrange(4, 20),
        "position.hdop": round(rng.uniform(0.5, 3), 1),
        "position.valid": True,
        "engine.ignition.status": rng.random() > 0.3,
        "battery.voltage": round(rng.uniform(3.9, 4.2), 3),
        "external.powersource.voltage": round(rng.uniform(12, 28), 2),
        "gsm.signal.level": rng.randrange(100),
        "gsm.mcc": 246,
        "gsm.mnc": 3,
        "gsm.lac": 1022,
        "gsm.cellid": rng.randrange(65535),
        "din": rng.randrange(16),
        "ain.1": round(rng.random(), 3),
        "ain.2": None,
        "can.fuel.level": round(rng.uniform(0, 100), 1),
        "can.engine.rpm": rng.randrange(600, 3000),
        "can.vehicle.mileage": round(100000 + number / 10, 1),
        "can.engine.temperature": rng.randrange(60, 100),
        "can.error.codes": ["P0101", "P0420"] if rng.random() > 0.5 else [],
        "ble.beacons": [
            {"ble.beacon.id": f"{rng.randrange(16**8):08x}", "ble.rssi": -rng.randrange(40, 95)}
            for _ in range(2)
        ],
        "io.239": 1,
        "io.240": rng.randrange(2),
        "io.21": 4,
        "event.enum": 0,
        "movement.status": rng.random() > 0.5,
        "report.reason": "периодический",
        "sim.iccid": "89370012345678901234",
        "vehicle.mileage": round(98765.4 + number / 10, 1),
        "tracker.info": {"fw": "03.28.07", "hw": "FMB920"},
        "alarm.event.trigger": None,
    }


def sample_messages(count: int, seed: int = 0, start: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [sample_message(start + i, rng) for i in range(count)]


@dataclass
class EmulatorStats:
    batches: int = 0
    posts: int = 0
    non_200: int = 0
    connection_errors: int = 0
    resent_acknowledged: int = 0
    messages_sent: int = 0
    reply_times: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)


def batches_of(messages: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(messages), size):
        yield messages[start : start + size]


class StreamEmulator:
    """Delivers messages to one URL with flespi's at-least-once, one-at-a-time behaviour."""

    def __init__(
        self,
        url: str,
        *,
        authorization: str | None = None,
        gzip_level: int | None = None,
        resend_rate: float = 0.0,
        retry_delay: float = 0.05,
        timeout: float = 60.0,
        seed: int = 0,
        max_attempts: int | None = None,
    ) -> None:
        self.url = url
        self.headers = {"Content-Type": "application/json"}
        if authorization:
            self.headers["Authorization"] = authorization
        if gzip_level is not None:
            self.headers["Content-Encoding"] = "gzip"
        self.gzip_level = gzip_level
        self.resend_rate = resend_rate
        self.retry_delay = retry_delay
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.rng = random.Random(seed)
        # None: like flespi, try forever; a number: give up loudly (benchmarks, load tests)
        self.max_attempts = max_attempts
        self.stats = EmulatorStats()

    def _body(self, messages: Sequence[bytes]) -> bytes:
        body = b"[" + b",".join(messages) + b"]"
        if self.gzip_level is not None:
            return gzip.compress(body, self.gzip_level)
        return body

    async def deliver(self, session: aiohttp.ClientSession, messages: Sequence[bytes]) -> None:
        """POST one batch until it gets a 200, as flespi does."""
        body = self._body(messages)
        attempts = 0
        while True:
            attempts += 1
            if self.max_attempts is not None and attempts > self.max_attempts:
                raise RuntimeError(
                    f"batch of {len(messages)} not acknowledged after {self.max_attempts} "
                    f"attempts; replies so far: {self.stats.statuses}"
                )
            self.stats.posts += 1
            started = time.perf_counter()
            try:
                async with session.post(self.url, data=body, headers=self.headers) as reply:
                    await reply.read()
                    status = reply.status
            except (aiohttp.ClientError, TimeoutError):
                self.stats.connection_errors += 1
                await asyncio.sleep(self.retry_delay)
                continue
            self.stats.reply_times.append(time.perf_counter() - started)
            self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
            if status == 200:
                self.stats.messages_sent += len(messages)
                return
            self.stats.non_200 += 1
            await asyncio.sleep(self.retry_delay)

    async def run(self, messages: Sequence[bytes], batch_size: int) -> EmulatorStats:
        """Deliver every message (each already JSON-encoded) in batches of `batch_size`."""
        acknowledged: list[bytes] = []
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            for batch in batches_of(messages, batch_size):
                await self.deliver(session, batch)
                self.stats.batches += 1
                acknowledged.extend(batch)
                if acknowledged and self.rng.random() < self.resend_rate:
                    # a lost reply: part of what was acknowledged comes again, split differently
                    start = self.rng.randrange(len(acknowledged))
                    again = acknowledged[start : start + self.rng.randrange(1, batch_size + 1)]
                    await self.deliver(session, again)
                    self.stats.resent_acknowledged += len(again)
        return self.stats


def encode_messages(messages: Sequence[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(m) for m in messages]
