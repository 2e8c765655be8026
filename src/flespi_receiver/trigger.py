"""The row trigger on messages that keeps device_state for inserts by other sessions.

The receiver keeps device_state itself, in each batch's transaction (device_state.py), and its
sessions say so (`flespi_receiver.writer = 'receiver'`), which the trigger's WHEN condition
checks before anything is queued: the receiver's rows cost it one condition each. A user's
session (psql, a backfill script) has no such setting, so its inserts keep the state too, one
row at a time. With device_state off, the trigger is dropped; it is one per database, so
receivers writing to one database should share that setting.
"""

from __future__ import annotations

from datetime import datetime
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
# the trigger's mode, its argument ('' for one made before it had one); no row: no trigger
TRIGGER_MODE = """
SELECT CASE WHEN tgnargs > 0 THEN split_part(encode(tgargs, 'escape'), '\\000', 1) ELSE '' END
FROM pg_trigger
WHERE tgname = 'messages_keep_device_state'
  AND tgrelid = to_regclass(current_schema() || '.messages')
"""
# MODE: the mode of other sessions' inserts unless they set flespi_receiver.device_state_merge
# (schema/0016_trigger_follows_the_mode.sql)
CREATE_TRIGGER = """
CREATE OR REPLACE TRIGGER messages_keep_device_state
    AFTER INSERT ON messages
    FOR EACH ROW
    WHEN (current_setting('flespi_receiver.writer', true) IS DISTINCT FROM 'receiver'
          AND NEW.ident IS NOT NULL)
    EXECUTE FUNCTION keep_device_state_of_row('MODE')
"""
DROP_TRIGGER = "DROP TRIGGER IF EXISTS messages_keep_device_state ON messages"
# made with the trigger, in its transaction, and cleared in the transaction of the catch-up
# that follows (device_state.catch_up_states): a start stopped between the two (a kill, a
# statement_timeout) leaves the catch-up to the next one, which would otherwise find the
# trigger in place and never catch up
CATCHING_UP = "catching up with the messages stored while device_state was off"
MARK_CATCHING_UP = f"COMMENT ON TRIGGER messages_keep_device_state ON messages IS '{CATCHING_UP}'"
CLEAR_CATCHING_UP = "COMMENT ON TRIGGER messages_keep_device_state ON messages IS NULL"
# made with the drop, in its transaction: since when device_state is off (the database's clock),
# where the catch-up starts from in merge mode; cleared with the catch-up, kept if one is there
# already (switched off again before a catch-up completed: the earlier time counts)
MARK_OFF_SINCE = """
DO $$ BEGIN
    IF obj_description('device_latest'::regclass, 'pg_class') IS NULL THEN
        EXECUTE format('COMMENT ON TABLE device_latest IS %L', 'device_state off since ' || now());
    END IF;
END $$
"""
OFF_SINCE = """
SELECT substring(obj_description(to_regclass(current_schema() || '.device_latest'), 'pg_class')
                 FROM '^device_state off since (.+)$')::timestamptz
"""
CLEAR_OFF_SINCE = "COMMENT ON TABLE device_latest IS NULL"
CATCH_UP_PENDING = """
SELECT coalesce(obj_description(oid, 'pg_trigger') = $1, false) FROM pg_trigger
WHERE tgname = 'messages_keep_device_state'
  AND tgrelid = to_regclass(current_schema() || '.messages')
"""


async def apply_trigger(
    conn: Connection, db: DatabaseSettings
) -> Literal["created", "dropped", "changed"] | None:
    """Create, drop or change the trigger to match the settings (device_state, and
    device_state_merge for its mode); what was done, if anything."""
    mode = "merge" if db.device_state_merge else "latest"
    current: str | None = await conn.fetchval(TRIGGER_MODE)
    create = CREATE_TRIGGER.replace("MODE", mode)
    action: Literal["created", "dropped", "changed"]
    if not db.device_state:
        if current is None:
            return None
        # one query of two statements: one transaction
        await conn.execute(f"{DROP_TRIGGER}; {MARK_OFF_SINCE}")
        action = "dropped"
    elif current is None:
        # one query of two statements: one transaction
        await conn.execute(f"{create}; {MARK_CATCHING_UP}")
        action = "created"
    elif current != mode:
        await conn.execute(create)
        action = "changed"
    else:
        return None
    log.info(f"trigger on messages {action}", device_state=db.device_state, mode=mode)
    return action


async def catch_up_pending(conn: Connection) -> bool:
    """Whether the trigger was made again and the catch-up that follows has not committed."""
    return bool(await conn.fetchval(CATCH_UP_PENDING, CATCHING_UP))


async def off_since(conn: Connection) -> datetime | None:
    """Since when device_state is off, as the drop recorded it; None if unknown (dropped by a
    previous version, or never)."""
    since: datetime | None = await conn.fetchval(OFF_SINCE)
    return since
