"""The statement trigger on messages (device_state and NOTIFY), kept only while it is needed.

Its transition table copies every inserted row, which costs about 6 % of COPY's throughput
even when the trigger then does nothing; so with device state and notifications both off,
the trigger is dropped, and it is created again when either is switched on. The trigger is
one per database: receivers writing to one database should share these settings.
"""

from __future__ import annotations

from typing import Literal

import structlog

from flespi_receiver.config import DatabaseSettings
from flespi_receiver.store import Connection

log = structlog.get_logger("flespi_receiver.trigger")

TRIGGER_EXISTS = """
SELECT EXISTS (
    SELECT 1 FROM pg_trigger
    WHERE tgname = 'messages_after_insert'
      AND tgrelid = to_regclass(current_schema() || '.messages')
)
"""
CREATE_TRIGGER = """
CREATE OR REPLACE TRIGGER messages_after_insert
    AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_messages
    FOR EACH STATEMENT EXECUTE FUNCTION after_messages_insert()
"""
DROP_TRIGGER = "DROP TRIGGER IF EXISTS messages_after_insert ON messages"


async def apply_trigger(
    conn: Connection, db: DatabaseSettings
) -> Literal["created", "dropped"] | None:
    """Create or drop the trigger to match the settings; what was done, if anything."""
    needed = db.device_state or bool(db.notify_channel)
    if await conn.fetchval(TRIGGER_EXISTS) == needed:
        return None
    await conn.execute(CREATE_TRIGGER if needed else DROP_TRIGGER)
    action: Literal["created", "dropped"] = "created" if needed else "dropped"
    log.info(
        f"trigger on messages {action}",
        device_state=db.device_state,
        notify_channel=db.notify_channel,
    )
    return action
