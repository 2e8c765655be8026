"""The SQL shown to users runs, as written, against the schema the receiver creates."""

from __future__ import annotations

import re
import time
from pathlib import Path

import asyncpg
import orjson
import pytest

from flespi_receiver.columns import apply_columns
from flespi_receiver.config import ColumnSettings

from conftest import ClientFactory
from helpers import AUTH, flespi_message

ROOT = Path(__file__).parent.parent
SQL_BLOCK = re.compile(r"```sql\n(.*?)```", re.DOTALL)


def statements(document: str) -> list[str]:
    found = []
    for block in SQL_BLOCK.findall((ROOT / document).read_text()):
        for statement in block.split(";\n"):
            code = (
                "\n".join(
                    line for line in statement.splitlines() if not line.strip().startswith("--")
                )
                .strip()
                .rstrip(";")
            )
            if code:
                found.append(code)
    return found


@pytest.mark.parametrize("document", ["docs/sql.md", "README.md"])
async def test_documented_queries_run(
    receiver: ClientFactory, db: asyncpg.Connection, document: str
) -> None:
    client = await receiver()
    batch = [flespi_message(i, ident="352625333222111") for i in range(5)]
    # payload keeps whatever a device sends: parameters the recipes read as numbers arrive as
    # text, objects, lists, booleans, inside the recipes' time ranges (2025-11-24, last day)
    odd = [
        {"position.speed": "fast", "can.fuel.level": "n/a"},
        {"position.speed": {"kmh": 5}, "can.fuel.level": [1, 2]},
        {"position.speed": True, "can.fuel.level": {"l": 3}},
        {"position.speed": "12.5", "can.fuel.level": False},
    ]
    for when in (1763985600, time.time() - 60):
        batch += [
            flespi_message(0, ident="352625333222111", timestamp=when + i, **values)
            for i, values in enumerate(odd)
        ]
    batch.append(flespi_message(9, **{"can.fuel.level": 42.5, "timestamp": time.time() - 30}))
    reply = await client.post("/flespi", data=orjson.dumps(batch), headers=AUTH)
    assert (await reply.json())["stored"] == len(batch)
    # every kind of rejected row the receiver writes: the recipes must work on all of them
    hostile = b'[{"ident": "\xff\xfe"}, {"note": "\\u0000"}, {"ident": 1, "ident": 2}]'
    for body in (hostile, b"\x00 not json \xff"):
        reply = await client.post("/flespi", data=body, headers=AUTH)
        assert reply.status == 200
    assert await db.fetchval("SELECT count(*) FROM flespi.rejected_messages") == 4
    speed = ColumnSettings(name="speed", parameter="position.speed", type="double precision")
    await apply_columns(db, [speed])
    await db.execute("SET search_path = flespi, public")
    found = statements(document)
    assert found
    for statement in found:
        await db.execute(statement)
    if document == "README.md":
        fuel = next(s for s in found if "AS fuel" in s)
        values = [row["fuel"] for row in await db.fetch(fuel)]
        assert sorted(v for v in values if v is not None) == [42.5]  # the number, typed
        assert values.count(None) == 2 * len(odd)  # the text, objects, lists, booleans
