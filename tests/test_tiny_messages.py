"""A body of very many tiny messages, each from a device of its own: the same rows, device
state and counts as any batch, at a few times the body's size in memory."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from flespi_receiver.bench_shapes import tiny_messages
from flespi_receiver.device_fold import KEPT_DEVICES
from flespi_receiver.identity import IDENTITY_SIZE, text_identity
from flespi_receiver.identity_set import Distinct, IdentitySet

from conftest import STREAM_TOML
from helpers import AUTH, count, memory_kib, receiver_of_its_own, reset_peak

SECOND_STREAM = STREAM_TOML.replace('"main"', '"second"').replace('"/flespi"', '"/second"')
DEVICES = KEPT_DEVICES + 300


def _fleet() -> list[bytes]:
    """More devices than a batch folds in Python, one message each; and for some of them
    more: older, newer, equal times (the identity decides), no time, other parameters and
    positions; and messages without an ident."""
    texts = [
        orjson.dumps({"ident": f"d{i:05d}", "timestamp": 1764000000 + i, "v": 0, "p": "base"})
        for i in range(DEVICES)
    ]
    for i in range(0, DEVICES, 97):
        ts = 1764000000 + i
        for extra in (
            {"ident": f"d{i:05d}", "timestamp": ts - 5, "v": 1, "old": i, "p": "older"},
            {"ident": f"d{i:05d}", "timestamp": ts - 4, "position.latitude": 1},
            {"ident": f"d{i:05d}", "timestamp": ts + 0.5, "v": 2, "position.longitude": 2.5},
            {"ident": f"d{i:05d}", "timestamp": ts + 0.5, "v": 3, "same time": True},
            {"ident": f"d{i:05d}", "v": 4, "untimed": [i]},
            {"v": i},
        ):
            texts.append(orjson.dumps(extra))
    texts.append(orjson.dumps({"ident": "no time", "v": 1}))
    texts.append(orjson.dumps({"ident": "no time", "w": 2}))
    return texts


def _latest(texts: list[bytes]) -> dict[str, tuple[float | None, bytes]]:
    """Per ident, the latest message: by time (none is the oldest), ties by identity."""
    latest: dict[str, tuple[float, bytes, float | None]] = {}
    for text in texts:
        message = orjson.loads(text)
        if "ident" not in message:
            continue
        ts = message.get("timestamp")
        key = (float("-inf") if ts is None else ts, text_identity(text), ts)
        held = latest.get(message["ident"])
        if held is None or key[:2] > held[:2]:
            latest[message["ident"]] = key
    return {ident: (ts, identity) for ident, (_, identity, ts) in latest.items()}


async def _states(db: asyncpg.Connection, stream: str) -> dict[str, tuple[Any, ...]]:
    """Per ident: time, identity, then what merge mode keeps (payload, position)."""
    rows = await db.fetch(
        "SELECT ident, ts, message_hash, payload, latitude, longitude FROM device_state "
        "WHERE stream = $1",
        stream,
    )
    return {
        row["ident"]: (
            None if row["ts"] is None else row["ts"].timestamp(),
            row["message_hash"],
            orjson.loads(row["payload"]),
            row["latitude"],
            row["longitude"],
        )
        for row in rows
    }


async def _post(client: Any, path: str, texts: list[bytes]) -> dict[str, int]:
    body = b"[" + b",".join(texts) + b"]"
    reply = await client.post(path, data=io.BytesIO(body), headers=AUTH)
    assert reply.status == 200, await reply.text()
    answer: dict[str, int] = await reply.json()
    return answer


@pytest.mark.parametrize("merge", [False, True], ids=["latest", "merge mode"])
async def test_a_batch_of_very_many_devices_keeps_the_state_of_ordinary_batches(
    receiver: Any, db: asyncpg.Connection, merge: bool
) -> None:
    client = await receiver(
        streams=STREAM_TOML + SECOND_STREAM, database=f"device_state_merge = {str(merge).lower()}"
    )
    texts = _fleet()
    # one body on the first stream (with copies of two messages, one past the first 4096),
    # the same messages in ordinary batches on the second
    assert await _post(client, "/flespi", [*texts, texts[100], texts[-1]]) == {
        "stored": len(texts),
        "duplicates": 2,
        "rejected": 0,
    }
    for start in range(0, len(texts), 1000):
        await _post(client, "/second", texts[start : start + 1000])
    states = await _states(db, "main")
    assert len(states) == DEVICES + 1
    assert states == await _states(db, "second")
    latest = {ident: state[:2] for ident, state in states.items()}
    assert latest == _latest(texts)
    if merge:  # the last value of every parameter, and the last position
        tied = [
            orjson.loads(t)
            for t in texts
            if t.startswith(b'{"ident":"d00097","timestamp":1764000097.5')
        ]
        last = max(tied, key=lambda m: text_identity(orjson.dumps(m)))
        assert states["d00097"][2:] == (
            {
                **last,
                "untimed": [97],
                "old": 97,
                "position.latitude": 1,
                "position.longitude": 2.5,
                "same time": True,
                "p": "base",
            },
            1,
            2.5,
        )

    # sent again with newer messages of some devices: the careful path, the same state again
    newer = [
        orjson.dumps({"ident": f"d{i:05d}", "timestamp": 1764100000, "new": i})
        for i in range(0, 900, 7)
    ]
    again = [texts[0], texts[0], *texts, *newer]
    assert await _post(client, "/flespi", again) == {
        "stored": len(newer),
        "duplicates": len(texts) + 2,
        "rejected": 0,
    }
    for start in range(0, len(newer), 1000):
        await _post(client, "/second", newer[start : start + 1000])
    states = await _states(db, "main")
    assert states == await _states(db, "second")
    assert {ident: state[:2] for ident, state in states.items()} == _latest(texts + newer)
    assert await count(db) == 2 * len(texts) + 2 * len(newer)


BODY_SIZE = 4 * 1024 * 1024
BODIES = {
    "stored": lambda: tiny_messages(BODY_SIZE, 1),
    "one bad in 3 000": lambda: tiny_messages(BODY_SIZE, 2, 3000),
}


@pytest.mark.parametrize("shape", sorted(BODIES))
async def test_a_body_of_tiny_messages_from_as_many_devices_costs_a_few_times_its_size(
    tmp_path: Path, database_url: str, db: asyncpg.Connection, shape: str
) -> None:
    body = BODIES[shape]()
    # a receiver process of its own: its peak is this body's alone
    async with receiver_of_its_own(tmp_path, database_url, 2 * BODY_SIZE) as (session, url, pid):
        before = memory_kib(pid, "VmHWM")
        async with session.post(url, data=io.BytesIO(body), headers=AUTH) as reply:
            assert reply.status == 200, await reply.text()
            answer = await reply.json()
        cost = (memory_kib(pid, "VmHWM") - before) * 1024 / len(body)
    bad = body.count(b'"ident":"bad"')
    elements = body.count(b"},{") + 1
    assert answer == {"stored": elements - bad, "duplicates": 0, "rejected": bad}
    assert await db.fetchval("SELECT count(*) FROM device_state") == elements - bad
    assert await count(db, "rejected_messages") == bad
    assert cost <= 4, cost


def test_copies_are_caught_among_very_many_identities_however_alike() -> None:
    identities = [hashlib.sha256(b"%d" % i).digest()[:IDENTITY_SIZE] for i in range(10_000)]
    # the same first 8 bytes, another rest: another message
    alike = [identity[:8] + bytes(8) for identity in identities[::100]]
    distinct = Distinct()
    firsts = [distinct.first(i) for i in [*identities, *alike, *identities[::7], *alike[:3]]]
    assert firsts == [True] * (len(identities) + len(alike)) + [False] * (len(identities[::7]) + 3)
    assert distinct.repeated == len(identities[::7]) + 3
    compact = IdentitySet(identities)
    assert len(compact) == len(identities)
    assert all(compact.add(identity) for identity in alike)
    assert not any(compact.add(identity) for identity in [*identities, *alike])
    with pytest.raises(ValueError, match="16 bytes"):
        compact.add(b"short")


async def _send_tiny(session: aiohttp.ClientSession, url: str, body: bytes) -> int | str:
    """POST `body` with its Content-Length: the reply's status, or "closed" when the receiver
    closed the connection before the client had sent it all (after a 503)."""
    try:
        async with session.post(url, data=io.BytesIO(body), headers=AUTH) as reply:
            await reply.read()
            return reply.status
    except aiohttp.ClientConnectionError:
        return "closed"


MESSAGES = 95_000


async def test_bodies_of_tiny_messages_in_flight_are_bounded(
    tmp_path: Path, database_url: str, db: asyncpg.Connection
) -> None:
    # bodies of 2.8 MiB: each needs three of the four slots near its end
    max_body_size, in_flight = 4 * 1024 * 1024, 4  # bodies_in_flight's default
    # messages of 30 bytes, no ident, no time: 95 000 in a body of 2.8 MiB
    bodies = [
        b"[" + b",".join(b'{"i":"tiny-bounded-%02d-%06d"}' % (n, i) for i in range(MESSAGES)) + b"]"
        for n in range(in_flight)
    ]
    assert all(len(body) < max_body_size for body in bodies)
    async with receiver_of_its_own(tmp_path, database_url, max_body_size) as (session, url, pid):
        # small batches first, as many at once as may be in flight, so that what a batch
        # loads (a pool connection each) is in the baseline
        warm = [orjson.dumps([{"warm": n, "i": i} for i in range(100)]) for n in range(in_flight)]
        warmed = await asyncio.gather(*(_send_tiny(session, url, body) for body in warm))
        assert warmed == [200] * in_flight
        reset_peak(pid)
        before = memory_kib(pid)
        replies = await asyncio.gather(*(_send_tiny(session, url, body) for body in bodies))
        peak = (memory_kib(pid, "VmHWM") - before) * 1024
    # a body of tiny messages needs every slot near its end (its chunks, each message's
    # identity): the bodies take turns, those that found no room are told 503 (and would be
    # sent again), and what the bodies hold stays within max_body_size x bodies_in_flight
    assert set(replies) <= {200, 503, "closed"}, replies
    assert 200 in replies
    assert peak < in_flight * max_body_size, f"peak {peak / 2**20:.1f} MiB, {replies}"
    assert await count(db) == MESSAGES * replies.count(200) + 1 + 100 * in_flight
