"""PostgreSQL enforces the receiver's time limits itself, so that nothing runs on after a 503.

A limit kept only by the client (asyncpg's command_timeout) ends in closing the connection,
which does not stop the server: a statement waiting for a lock would go on, and commit, once
the lock is gone, after its batch was answered 503. So every session bounds its statements
with `statement_timeout` = database.command_timeout (PostgreSQL cancels the statement and
rolls its transaction back; the error is SQLSTATE 57014), unless the server's own setting is
already shorter. asyncpg's command_timeout stays as a backstop for a server that does not
answer at all, CLIENT_GRACE seconds later.

A large body is stored by a COPY while it arrives: its transaction allows the time left for
the body on top of the session's statement_timeout (the arrival is not the database's work,
whatever the server's own limit), and bounds its wait for a lock with `lock_timeout` =
command_timeout (a body is not read while its COPY waits).
See https://www.postgresql.org/docs/current/runtime-config-client.html (statement_timeout,
lock_timeout; pg_settings gives both in milliseconds).
"""

from __future__ import annotations

from asyncpg import Connection
from asyncpg.pool import PoolConnectionProxy

# seconds after command_timeout that the client gives up on a server that does not answer
CLIENT_GRACE = 2.0

# the session's statement_timeout, unless the server's own is shorter ($1 text, $2 ms)
_BOUND_SESSION = """
SELECT set_config('statement_timeout', $1, false) FROM pg_settings
WHERE name = 'statement_timeout' AND (setting::bigint = 0 OR setting::bigint > $2)
"""
# one transaction's limits: statements may take the body's arrival ($1 ms) on top of the
# session's own limit (command_timeout, or the server's if shorter); a lock is waited for at
# most command_timeout ($2 ms), or the server's lock_timeout if shorter. Each setting is read
# by current_setting() (a number and a unit, such as 1min, 500ms or 0: an interval's text), not
# from pg_settings, which makes a row for each of the server's ~350 settings: 0.2 ms a batch
# instead of 1.2.
_BOUND_STREAMED = """
SELECT set_config(
           'statement_timeout',
           ($1 + coalesce(nullif((extract(epoch FROM current_setting('statement_timeout')::interval)
                                  * 1000)::bigint, 0), $2))::text || 'ms',
           true),
       set_config(
           'lock_timeout',
           least(coalesce(nullif((extract(epoch FROM current_setting('lock_timeout')::interval)
                                  * 1000)::bigint, 0), $2), $2)::text || 'ms',
           true)
"""


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def client_timeout(command_timeout: float) -> float:
    """Seconds asyncpg waits for the server before it gives up on the connection."""
    return command_timeout + CLIENT_GRACE


async def bound_session(conn: Connection | PoolConnectionProxy, command_timeout: float) -> None:
    """Set the session's statement_timeout to `command_timeout` seconds (see module doc)."""
    ms = _milliseconds(command_timeout)
    await conn.execute(_BOUND_SESSION, f"{ms}ms", ms)


async def bound_streamed(
    conn: Connection | PoolConnectionProxy, command_timeout: float, arrival: float
) -> None:
    """In the current transaction: statements may take `arrival` seconds (the body arrives
    meanwhile, which is not the database's work) on top of the session's own limit, and a lock
    may be waited for `command_timeout` seconds (or the server's lock_timeout if shorter)."""
    await conn.execute(_BOUND_STREAMED, _milliseconds(arrival), _milliseconds(command_timeout))
