"""Typed columns for chosen parameters, through the messages_typed view."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import orjson
import pytest

from flespi_receiver.columns import apply_columns
from flespi_receiver.config import ColumnSettings, load_settings
from flespi_receiver.errors import ConfigError

from conftest import ClientFactory
from helpers import AUTH

SPEED = ColumnSettings(
    name="speed", parameter="position.speed", type="double precision", index=True
)
COLUMNS = [
    SPEED,
    ColumnSettings(name="ignition", parameter="engine.ignition.status", type="boolean"),
    ColumnSettings(name="driver", parameter="driver's name", type="text"),
    ColumnSettings(name="reported", parameter="report.time", type="timestamptz"),
    ColumnSettings(name="odometer", parameter="can.vehicle.mileage", type="bigint"),
]


async def test_typed_columns_cover_old_and_new_rows(
    receiver: ClientFactory, db: asyncpg.Connection
) -> None:
    client = await receiver()
    before = {
        "ident": "A",
        "position.speed": 61.5,
        "engine.ignition.status": True,
        "driver's name": "Олена",
        "report.time": 1764000000,
        "can.vehicle.mileage": 123456,
    }
    await client.post("/flespi", data=orjson.dumps([before]), headers=AUTH)
    await apply_columns(db, COLUMNS)  # configured after the first row was stored
    odd = {
        "ident": "B",
        "position.speed": "fast",
        "engine.ignition.status": "yes",
        "driver's name": 7,
        "report.time": 1e15,
        "can.vehicle.mileage": 1.5,
    }
    await client.post("/flespi", data=orjson.dumps([odd]), headers=AUTH)
    rows = await db.fetch(
        "SELECT ident, speed, ignition, driver, reported, odometer FROM messages_typed ORDER BY id"
    )
    assert [tuple(r.values())[:4] for r in rows] == [
        ("A", 61.5, True, "Олена"),
        ("B", None, None, "7"),
    ]
    assert rows[0]["reported"].timestamp() == 1764000000
    assert (rows[0]["odometer"], rows[1]["reported"], rows[1]["odometer"]) == (123456, None, None)


async def test_columns_follow_configuration_changes(db: asyncpg.Connection) -> None:
    await apply_columns(db, COLUMNS)
    await apply_columns(
        db, [ColumnSettings(name="speed", parameter="position.speed", type="bigint")]
    )
    names = [
        r["column_name"]
        for r in await db.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'messages_typed' ORDER BY ordinal_position"
        )
    ]
    assert names[-1] == "speed"
    assert "ignition" not in names
    # the index built for the first configuration is kept, and used for filters
    await db.execute("SET enable_seqscan = off")
    await apply_columns(db, [SPEED])
    plan = "\n".join(
        r[0] for r in await db.fetch("EXPLAIN SELECT id FROM messages_typed WHERE speed > 50")
    )
    assert "messages_typed_speed" in plan


@pytest.mark.parametrize(
    ("column", "error"),
    [
        ('name = "ts"\nparameter = "x"\ntype = "text"', "already a column of messages"),
        ('name = "a b"\nparameter = "x"\ntype = "text"', "columns.0.name"),
        ('name = "x"\nparameter = "x"\ntype = "money"', "columns.0.type"),
    ],
    ids=["taken-name", "bad-name", "bad-type"],
)
def test_bad_column_config_names_the_key(tmp_path: Path, column: str, error: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[[columns]]\n{column}\n[[streams]]\nname = "m"\npath = "/f"\nauthorization = ["t"]\n'
    )
    with pytest.raises(ConfigError, match=error):
        load_settings(path)
