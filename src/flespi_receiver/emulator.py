"""A stream emulator that behaves like flespi: one sender, the next batch only after a 200.

Anything but 200 (or a dropped connection, or a timeout) makes it send the same batch again.
It can also re-send batches that were already acknowledged, with other boundaries, the way a
reply lost on the way back makes flespi do. Used by the tests, the benchmark and
`flespi-receiver emulate URL` for load-testing a deployment; the latter gives up with
DeliveryFailed on what retrying can't fix (`stop_on_refusal`): a 4xx other than 408, or
nothing listening at the URL.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

# messages of the tests and the benchmark are the same from run to run
FIXED_START = 1764000000
# what retrying can't fix: a client error other than 408 (the body took too long)
RETRYABLE_CLIENT_ERRORS = frozenset({408})
REASONS = {
    401: "the receiver refused the credentials: check --authorization",
    403: "the receiver refuses this client's address (allowed_networks)",
    404: "no stream at this path: check the URL against the streams' path",
    413: "the batch is larger than the receiver's max_body_size: lower --batch-size",
    429: "too many failed authentications from this address: check --authorization and "
    "wait a minute",
}


class DeliveryFailed(RuntimeError):
    """A batch that will not be acknowledged: the reply says why, or the retries ran out."""


def sample_message(
    number: int, rng: random.Random, start: int = FIXED_START, devices: int = 5000
) -> dict[str, Any]:
    """A realistic message: ~45 dotted parameters, ~0.9 KB, arrays, objects, non-ASCII, nulls.

    Its device time is `start + number` seconds (server time 0.75 s later). It comes from
    device `number % devices`: a batch of consecutive messages holds min(batch size,
    devices) distinct devices.
    """
    second = start + number
    device = number % devices
    return {
        "ident": f"35{device:013d}",
        "timestamp": second + rng.randrange(1_000_000) / 1e6,
        "server.timestamp": second + 0.75,
        "channel.id": 1234,
        "device.id": 5_000_000 + device,
        "device.name": f"Грузовик №{device}",
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


def sample_messages(
    count: int, seed: int = 0, start: int = 0, start_time: int = FIXED_START, devices: int = 5000
) -> list[dict[str, Any]]:
    """`count` messages numbered from `start`, one second apart from `start_time`, from
    `devices` devices in turn."""
    rng = random.Random(seed)
    return [sample_message(start + i, rng, start_time, devices) for i in range(count)]


@dataclass
class EmulatorStats:
    batches: int = 0
    posts: int = 0
    non_200: int = 0
    connection_errors: int = 0
    resent_acknowledged: int = 0
    messages_sent: int = 0
    # the receiver's own counts, summed from its 200 replies
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
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
        stop_on_refusal: bool = False,
        on_batch: Callable[[int, EmulatorStats], None] | None = None,
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
        # False, like flespi: retry everything; True: DeliveryFailed on what retrying can't fix
        self.stop_on_refusal = stop_on_refusal
        # called with the number of new messages after each acknowledged batch (progress)
        self.on_batch = on_batch
        self.stats = EmulatorStats()

    def _body(self, messages: Sequence[bytes]) -> bytes:
        body = b"[" + b",".join(messages) + b"]"
        if self.gzip_level is not None:
            return gzip.compress(body, self.gzip_level)
        return body

    def body_of(self, messages: Sequence[bytes]) -> bytes:
        """The body this emulator posts for `messages` (gzipped when it gzips)."""
        return self._body(messages)

    async def deliver(
        self, session: aiohttp.ClientSession, messages: Sequence[bytes], body: bytes | None = None
    ) -> None:
        """POST one batch until it gets a 200, as flespi does. `body`: the batch's body made
        beforehand (body_of), so that a benchmark's clock does not time its making."""
        body = self._body(messages) if body is None else body
        attempts = 0
        delay = self.retry_delay
        while True:
            attempts += 1
            if self.max_attempts is not None and attempts > self.max_attempts:
                raise DeliveryFailed(
                    f"batch of {len(messages)} not acknowledged after {self.max_attempts} "
                    f"attempts; replies so far: {self._replies()}"
                )
            self.stats.posts += 1
            started = time.perf_counter()
            try:
                async with session.post(self.url, data=body, headers=self.headers) as reply:
                    content = await reply.read()
                    status = reply.status
            except aiohttp.ClientConnectorError as exc:
                self.stats.connection_errors += 1
                if self.stop_on_refusal:
                    raise DeliveryFailed(f"cannot connect to {self.url}: {exc.os_error}") from None
                await asyncio.sleep(delay)
                continue
            except (aiohttp.ClientError, TimeoutError):
                self.stats.connection_errors += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0) if self.stop_on_refusal else delay
                continue
            self.stats.reply_times.append(time.perf_counter() - started)
            self.stats.statuses[status] = self.stats.statuses.get(status, 0) + 1
            if status == 200:
                self.stats.messages_sent += len(messages)
                self._count(content)
                return
            self.stats.non_200 += 1
            refused = 400 <= status < 500 and status not in RETRYABLE_CLIENT_ERRORS
            if self.stop_on_refusal and refused:
                raise DeliveryFailed(self._refusal(status, content))
            await asyncio.sleep(delay)
            # a receiver that answers 503 is given time to recover, up to 2 s between tries
            delay = min(delay * 2, 2.0) if self.stop_on_refusal else delay

    def _replies(self) -> str:
        parts = [f"{count} x {status}" for status, count in sorted(self.stats.statuses.items())]
        if self.stats.connection_errors:
            parts.append(f"{self.stats.connection_errors} x no reply")
        return ", ".join(parts) or "none"

    def _refusal(self, status: int, content: bytes) -> str:
        try:
            said = orjson.loads(content).get("error")
        except (orjson.JSONDecodeError, AttributeError):
            said = None
        reason = REASONS.get(status, "the receiver refused the batch")
        return f"{self.url} answered {status}" + (f" ({said})" if said else "") + f": {reason}"

    def _count(self, content: bytes) -> None:
        try:
            counts = orjson.loads(content)
        except orjson.JSONDecodeError:
            return  # a receiver of another make; its 200 is all there is
        if isinstance(counts, dict):
            self.stats.stored += int(counts.get("stored", 0))
            self.stats.duplicates += int(counts.get("duplicates", 0))
            self.stats.rejected += int(counts.get("rejected", 0))

    async def run(self, messages: Sequence[bytes], batch_size: int) -> EmulatorStats:
        """Deliver every message (each already JSON-encoded) in batches of `batch_size`."""
        acknowledged: list[bytes] = []
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            for batch in batches_of(messages, batch_size):
                await self.deliver(session, batch)
                self.stats.batches += 1
                acknowledged.extend(batch)
                if self.on_batch is not None:
                    self.on_batch(len(batch), self.stats)
                if acknowledged and self.rng.random() < self.resend_rate:
                    # a lost reply: part of what was acknowledged comes again, split differently
                    start = self.rng.randrange(len(acknowledged))
                    again = acknowledged[start : start + self.rng.randrange(1, batch_size + 1)]
                    await self.deliver(session, again)
                    self.stats.resent_acknowledged += len(again)
        return self.stats


def encode_messages(messages: Sequence[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(m) for m in messages]
