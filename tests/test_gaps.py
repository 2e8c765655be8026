"""Gaps: an operator sees which stretch of time a stream is missing, and what to backfill."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson

from flespi_receiver.gaps import find_gaps

from conftest import ClientFactory
from helpers import AUTH, SCRIPT

DAY0 = datetime(2026, 11, 1, tzinfo=UTC)


def hourly(days: range, idents: tuple[str, ...]) -> list[dict[str, object]]:
    return [
        {"ident": ident, "timestamp": (DAY0 + timedelta(days=d, hours=h)).timestamp() + 0.5}
        for d in days
        for h in range(24)
        for ident in idents
    ]


async def test_a_receiver_down_for_ten_days_shows_as_one_gap(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    # three trackers report every hour; nothing was stored for days 5..14; a fourth tracker
    # reported once long ago and never again (it does not "normally report")
    messages = hourly(range(5), ("A", "B", "C")) + hourly(range(15, 20), ("A", "B", "C"))
    messages.append({"ident": "D", "timestamp": (DAY0 - timedelta(days=30)).timestamp()})
    reply = await client.post("/flespi", data=orjson.dumps(messages), headers=AUTH)
    assert reply.status == 200

    now = DAY0 + timedelta(days=22)
    gaps = await find_gaps(db, now=now, since=DAY0 - timedelta(days=60), min_gap=timedelta(hours=6))
    assert [(g.stream, g.open, g.devices) for g in gaps] == [
        # D's message, then nothing for a month: no device reported on both sides of it
        ("main", False, 3),
        ("main", True, 3),
    ]
    outage = gaps[0]
    assert outage.start == DAY0 + timedelta(days=4, hours=23, seconds=0.5)
    assert outage.end == DAY0 + timedelta(days=15, seconds=0.5)
    assert outage.backfill_command() == (
        f"flespi-receiver backfill --stream main --devices all "
        f"--from {int(outage.start.timestamp())} --to {int(outage.end.timestamp()) + 1}"
    )
    # the receiver has heard nothing since day 20 (its last message at 19 d 23 h)
    assert gaps[1].start == DAY0 + timedelta(days=19, hours=23, seconds=0.5)
    assert gaps[1].end == now

    # a shorter threshold than the reporting interval would call every hour a gap; a stream
    # filter keeps other streams out
    assert await find_gaps(db, now=now, since=DAY0, min_gap=timedelta(hours=2), stream="x") == []


async def test_one_tracker_uploading_its_history_does_not_hide_the_outage(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    messages = hourly(range(5), ("A", "B", "C")) + hourly(range(8, 12), ("A", "B", "C"))
    # out of coverage for a week, tracker D uploads what it buffered: inside the outage
    messages += hourly(range(5, 8), ("D",))
    reply = await client.post("/flespi", data=orjson.dumps(messages), headers=AUTH)
    assert reply.status == 200
    now = DAY0 + timedelta(days=12)
    gaps = await find_gaps(db, now=now, since=DAY0, min_gap=timedelta(hours=6))
    assert [(g.open, g.devices) for g in gaps] == [(False, 3)]
    assert gaps[0].start == DAY0 + timedelta(days=4, hours=23, seconds=0.5)
    assert gaps[0].end == DAY0 + timedelta(days=8, seconds=0.5)


async def test_the_gaps_command_prints_each_gap_with_its_backfill(
    receiver: ClientFactory, db: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    client = await receiver()
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = now - timedelta(days=12)
    messages = [
        {"ident": ident, "timestamp": (start + timedelta(hours=h)).timestamp()}
        for h in list(range(48)) + list(range(24 * 10, 24 * 12))
        for ident in ("A", "B")
    ]
    await client.post("/flespi", data=orjson.dumps(messages), headers=AUTH)
    config = tmp_path / "gaps.toml"
    config.write_text(
        f'[log]\nformat = "json"\n[database]\nurl = "{database_url}"\n'
        '[[streams]]\nname = "main"\npath = "/flespi"\nauthorization = ["Bearer x"]\n'
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [str(SCRIPT), "gaps", "--config", str(config), "--days", "14", "--min-gap", "6h"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    gap_from, gap_to = start + timedelta(hours=47), start + timedelta(days=10)
    assert result.stdout.splitlines() == [
        f"main: {gap_from:%Y-%m-%d %H:%M:%S} .. {gap_to:%Y-%m-%d %H:%M:%S} UTC, 8 d 1 h, "
        "2 devices reporting around it",
        f"    flespi-receiver backfill --stream main --devices all "
        f"--from {gap_from.timestamp():.0f} --to {gap_to.timestamp():.0f}",
        '    (first set identity = "content" for main: docs/recovery.md)',
    ]
