"""`flespi-receiver bench --memory-shapes BYTES`: the receiver's peak memory per body shape.

One body of about BYTES per shape (one huge string, one huge array, messages of 20 000 keys,
nesting at the limit, content that is quarantined, and very many tiny messages each from a
device of its own: stored, with bad ones among them, sent again, in merge mode), each sent to
a receiver process of its own, so that its peak resident memory (VmHWM) is that body's alone.
The cost is reported as (peak - the process's peak before the body) / the body's size.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from flespi_receiver.bench import (
    TOKEN,
    peak_rss_mb,
    prepare_database,
    process,
    receiver_config,
    wait_for_port,
)
from flespi_receiver.embedded import free_port
from flespi_receiver.emulator import encode_messages, sample_messages
from flespi_receiver.json_scan import MAX_DEPTH


def _repeat(element: bytes, size: int) -> bytes:
    count = max(1, size // (len(element) + 1))
    return b"[" + b",".join([element] * count) + b"]"


def _flespi(size: int) -> bytes:
    messages = encode_messages(sample_messages(max(1, size // 1100), seed=7))
    return b"[" + b",".join(messages) + b"]"


def _string(size: int) -> bytes:
    return b'[{"ident":"big","s":"' + b"x" * size + b'"}]'


def _array(size: int) -> bytes:
    return b'[{"ident":"big","a":[' + b",".join([b"1234567"] * (size // 8)) + b"]}]"


def _keys(size: int) -> bytes:
    message = orjson.dumps({f"key.{i:05d}": i for i in range(20_000)})
    return _repeat(message, size)


def _deep(size: int) -> bytes:
    levels = MAX_DEPTH - 1
    message = b'{"n":' + b"[" * levels + b"1" + b"]" * levels + b"}"
    return (
        b"["
        + b",".join(message.replace(b"1", str(i).encode(), 1) for i in range(size // len(message)))
        + b"]"
    )


def _duplicate_key(size: int) -> bytes:
    return b'[{"s":"' + b"x" * size + b'","s":1}]'


def _not_an_array(size: int) -> bytes:
    return b'{"s":"' + b"x" * size + b'"}'


# a tiny message of a device of its own: {ident}, then the batch's own time and value
TINY = b'{"ident":"dev%06d","timestamp":%d.5,"position.speed":%d,"battery.voltage":4.1}'


def tiny_messages(size: int, batch: int = 0, bad_every: int = 0) -> bytes:
    """A body of about `size` bytes of messages of about 80 bytes (TINY), each from a device of
    its own; `batch` sets their time and value (another batch of the same fleet); with
    `bad_every`, one message in that many has a duplicate key (quarantined)."""
    count = max(1, size // (len(TINY % (0, 1764000000, 0)) + 1))
    elements = []
    for i in range(count):
        element = TINY % (i, 1764000000 + batch, (i + batch) % 200)
        if bad_every and i % bad_every == bad_every // 2:
            element = b'{"ident":"bad",' + element[1:]
        elements.append(element)
    return b"[" + b",".join(elements) + b"]"


@dataclass(frozen=True, slots=True)
class Shape:
    """A body's shape; `configuration`: the receiver's (bench.CONFIGURATIONS); `resent`: the
    body is stored once by another receiver process before it is sent to the measured one."""

    make: Callable[[int], bytes]
    configuration: str = "default"
    resent: bool = False


SHAPES: dict[str, Shape] = {
    "flespi messages of about 1 KB": Shape(_flespi),
    "one huge string": Shape(_string),
    "one huge array of integers": Shape(_array),
    "messages of 20 000 keys": Shape(_keys),
    f"messages nested {MAX_DEPTH} levels": Shape(_deep),
    "quarantined: a huge string and a duplicate key": Shape(_duplicate_key),
    "quarantined: not an array": Shape(_not_an_array),
    "tiny messages, a device each": Shape(lambda size: tiny_messages(size, 1)),
    "tiny messages, one bad in 3 000": Shape(lambda size: tiny_messages(size, 2, 3000)),
    "tiny messages, sent again": Shape(lambda size: tiny_messages(size, 3), resent=True),
    "tiny messages, merge mode": Shape(lambda size: tiny_messages(size, 4), "merge"),
}


async def memory_by_shape(
    admin_url: str, body_size: int, only: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Peak RSS per shape; `only`: the shapes whose names contain one of these (all if none)."""
    url = await prepare_database(admin_url)
    results: dict[str, Any] = {}
    print(f"{'body':<48} {'MB':>6} {'before MB':>10} {'peak MB':>8} {'x body':>7}")
    with tempfile.TemporaryDirectory() as workdir:
        for name, shape in SHAPES.items():
            if only and not any(part in name for part in only):
                continue
            body = shape.make(body_size)
            max_body = max(len(body) + 1024, 2**20)
            if shape.resent:
                port = free_port()
                config = receiver_config(Path(workdir), url, port, max_body)
                await _post_to_receiver(config, port, body)
            port = free_port()
            config = receiver_config(Path(workdir), url, port, max_body, shape.configuration)
            before, peak, status, answer = await _post_to_receiver(config, port, body)
            ratio = (peak - before) * 2**20 / len(body)
            size_mb = len(body) / 2**20
            print(f"{name:<48} {size_mb:>6.1f} {before:>10.1f} {peak:>8.1f} {ratio:>7.2f}")
            results[name] = {
                "body_mb": round(size_mb, 1),
                "status": status,
                "reply": answer,
                "rss_before_mb": round(before, 1),
                "peak_rss_mb": round(peak, 1),
                "cost_per_body_byte": round(ratio, 2),
            }
    print(orjson.dumps(results).decode())
    return results


async def _post_to_receiver(config: Path, port: int, body: bytes) -> tuple[float, float, int, str]:
    """A small batch, then `body`, to a fresh receiver process (serving on `port`): its peak
    RSS (MB) before the body and after it, the reply's status and text."""
    command = [sys.executable, "-m", "flespi_receiver", "serve", "--config", str(config)]
    with process(command) as proc:
        await wait_for_port(port, proc)
        target = f"http://127.0.0.1:{port}/flespi"
        headers = {"Authorization": TOKEN, "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            # a small batch first, so that "before" holds everything a batch loads
            async with session.post(target, data=b'[{"a":1}]', headers=headers) as r:
                await r.read()
            before = peak_rss_mb(proc.pid)
            async with session.post(target, data=body, headers=headers) as reply:
                status, answer = reply.status, await reply.text()
            return before, peak_rss_mb(proc.pid), status, answer
