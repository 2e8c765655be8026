"""`flespi-receiver bench --memory-shapes BYTES`: the receiver's peak memory per body shape.

One body of about BYTES per shape (one huge string, one huge array, messages of 20 000 keys,
nesting at the limit, and content that is quarantined), each sent to a receiver process of its
own, so that its peak resident memory (VmHWM) is that body's alone. The cost is reported as
(peak - the process's peak before the body) / the body's size.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
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


SHAPES: dict[str, Callable[[int], bytes]] = {
    "flespi messages of about 1 KB": _flespi,
    "one huge string": _string,
    "one huge array of integers": _array,
    "messages of 20 000 keys": _keys,
    f"messages nested {MAX_DEPTH} levels": _deep,
    "quarantined: a huge string and a duplicate key": _duplicate_key,
    "quarantined: not an array": _not_an_array,
}


async def memory_by_shape(admin_url: str, body_size: int) -> dict[str, Any]:
    url = await prepare_database(admin_url)
    results: dict[str, Any] = {}
    print(f"{'body':<48} {'MB':>6} {'before MB':>10} {'peak MB':>8} {'x body':>7}")
    with tempfile.TemporaryDirectory() as workdir:
        for name, make in SHAPES.items():
            body = make(body_size)
            port = free_port()
            config = receiver_config(Path(workdir), url, port, max(len(body) + 1024, 2**20))
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
                    peak = peak_rss_mb(proc.pid)
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
