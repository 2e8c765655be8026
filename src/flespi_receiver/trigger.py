"""The row trigger on messages that keeps device_state for inserts by other sessions.

The receiver keeps device_state itself, in each batch's transaction (device_state.py), and its
sessions say so (`flespi_receiver.writer = 'receiver'`), which the trigger's WHEN condition
checks before anything is queued: the receiver's rows cost it one condition each. A user's
session (psql, a backfill script) has no such setting, so its inserts keep the state too, one
row at a time. With device_state off, the trigger is dropped; it is one per database, so
receivers writing to one database should share that setting.
"""

from __future__ import annotations

from typing import Literal

import structlog

from flespi_receiver.config import DatabaseSettings
from flespi_receiver.copy_in import Connection

log = structlog.get_logger("flespi_receiver.trigger")

TRIGGER_EXISTS = """
SELECT EXISTS (
    SELECT 1 FROM pg_trigger
    WHERE tgname = 'messages_keep_device_state'
      AND tgrelid = to_regclass(current_schema() || '.messages')
)
"""
CREATE_TRIGGER = """
CREATE OR REPLACE TRIGGER messages_keep_device_state
    AFTER INSERT ON messages
    FOR EACH ROW
    WHEN (current_setting('flespi_receiver.writer', true) IS DISTINCT FROM 'receiver'
          AND NEW.ident IS NOT NULL)
    EXECUTE FUNCTION keep_device_state_of_row()
"""
DROP_TRIGGER = "DROP TRIGGER IF EXISTS messages_keep_device_state ON messages"
# made with the trigger, in its transaction, and cleared in the transaction of the catch-up
# that follows (device_state.catch_up_states): a start stopped between the two (a kill, a
# statement_timeout) leaves the catch-up to the next one, which would otherwise find the
# trigger in place and never catch up
CATCHING_UP = "catching up with the messages stored while device_state was off"
MARK_CATCHING_UP = f"COMMENT ON TRIGGER messages_keep_device_state ON messages IS '{CATCHING_UP}'"
CLEAR_CATCHING_UP = "COMMENT ON TRIGGER messages_keep_device_state ON messages IS NULL"
CATCH_UP_PENDING = """
SELECT coalesce(obj_description(oid, 'pg_trigger') = $1, false) FROM pg_trigger
WHERE tgname = 'messages_keep_device_state'
  AND tgrelid = to_regclass(current_schema() || '.messages')
"""


async def apply_trigger(
    conn: Connection, db: DatabaseSettings
) -> Literal["created", "dropped"] | None:
    """Create or drop the trigger to match the settings; what was done, if anything."""
    needed = db.device_state
    if await conn.fetchval(TRIGGER_EXISTS) == needed:
        return None
    # one query of two statements: one transaction
    await conn.execute(f"{CREATE_TRIGGER}; {MARK_CATCHING_UP}" if needed else DROP_TRIGGER)
    action: Literal["created", "dropped"] = "created" if needed else "dropped"
    log.info(f"trigger on messages {action}", device_state=db.device_state)
    return action


async def catch_up_pending(conn: Connection) -> bool:
    """Whether the trigger was made again and the catch-up that follows has not committed."""
    return bool(await conn.fetchval(CATCH_UP_PENDING, CATCHING_UP))
