"""Small helpers shared by the tests: messages that look like flespi's, and table reads."""

from __future__ import annotations

from typing import Any

import asyncpg

TOKEN = "Bearer test-token"
AUTH = {"Authorization": TOKEN}


def flespi_message(i: int, **extra: Any) -> dict[str, Any]:
    """A message shaped like those flespi sends: flat, dotted names, a few nested values."""
    message: dict[str, Any] = {
        "ident": f"3526253332{i:05d}",
        "timestamp": 1764000000 + i + 0.25,
        "server.timestamp": 1764000001.5 + i,
        "channel.id": 1234,
        "device.id": 500000 + i,
        "device.name": f"Грузовик {i}",
        "position.latitude": 49.069782,
        "position.longitude": 28.632826,
        "position.speed": i % 120,
        "engine.ignition.status": i % 2 == 0,
        "ain.2": None,
        "can.error.codes": ["P0101", "P0420"],
        "ble.beacons": [{"ble.beacon.id": "a1b2", "ble.rssi": -70}],
    }
    message.update(extra)
    return message


async def count(db: asyncpg.Connection, table: str = "messages") -> int:
    return int(await db.fetchval(f"SELECT count(*) FROM {table}"))
