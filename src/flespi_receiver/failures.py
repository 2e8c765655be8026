"""What a database failure means: the database's state (retry later) or one message's content.

The rule, as the README's table states it:

- A failure that depends on time and the database, never on content (the connection, a
  command, statement or lock timeout, read-only, shutdown, resources, a deadlock or
  serialization failure, a connection in an unknown state) is the database's state,
  whichever message was being written: 503, nothing kept.
- Any other error PostgreSQL raises while a batch is written is decided message by message:
  a message whose insert fails while another message of the batch stores is refused content,
  quarantined with PostgreSQL's message, whatever raised it (a type, a constraint, an index
  limit, a trigger). When no message of the batch stores (a one-message batch included), the
  class decides: a data exception (22), an integrity constraint (23), a program limit (54), a
  WITH CHECK OPTION (44) or a trigger's own RAISE EXCEPTION (P0001) / ASSERT (P0004) are
  content; anything else (a missing table, revoked privileges, a broken trigger) is state.
"""

from __future__ import annotations

import time

import asyncpg
from asyncpg.exceptions import InternalClientError

# SQLSTATE of errors that depend on time and the database, never on one message's content,
# and the kind they are counted as
_STATE_CODES = {
    "25006": "read_only",
    "25P03": "idle_timeout",
    "40001": "serialization",
    "40P01": "deadlock",
    "53100": "disk_full",
    "53300": "too_many_connections",
    "55006": "object_in_use",
    "55P03": "lock_timeout",
    "57014": "statement_timeout",
    "57P01": "shutdown",
    "57P02": "shutdown",
    "57P03": "shutdown",
    "57P04": "shutdown",
}
_STATE_CLASSES = {
    "08": "connection",
    "40": "rollback",
    "53": "resources",
    "57": "operator_intervention",
    "58": "system_error",
    "72": "snapshot_failure",
}
# What the rest is counted as when every message of a batch fails with it
_SHARED_CODES = {"42501": "privileges", "42P01": "table_missing", "42703": "column_missing"}
_SHARED_CLASSES = {"42": "schema", "XX": "internal_error", "0A": "not_supported"}
# Classes and codes that refuse a message even when it is the only one (or all are refused)
_CONTENT = ("22", "23", "44", "54", "P0001", "P0004")


class PoolExhausted(TimeoutError):
    """No connection of the pool became free within database.acquire_timeout."""


def state_kind(exc: BaseException) -> str | None:
    """The kind of database state `exc` shows, or None when it may be about content (or a bug).

    Kinds are the labels of flespi_receiver_database_errors_total.
    """
    if isinstance(exc, PoolExhausted):
        return "pool_exhausted"
    if isinstance(exc, asyncpg.PostgresError):
        code = str(exc.sqlstate or "")
        return _STATE_CODES.get(code) or _STATE_CLASSES.get(code[:2])
    if isinstance(exc, TimeoutError):  # asyncpg's command_timeout
        return "command_timeout"
    if isinstance(exc, (OSError, asyncpg.ConnectionDoesNotExistError)):
        return "connection"  # e.g. the server ended the session (pg_terminate_backend)
    if isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, asyncpg.DataError):
        if "connection is closed" in str(exc):
            return "connection"  # the session ended under an operation
        return "connection_state"  # e.g. the connection closed, another operation in progress
    if isinstance(exc, InternalClientError):
        return "connection_state"  # e.g. "cannot switch to state 15"
    return None


def shared_kind(exc: asyncpg.PostgresError) -> str | None:
    """When every message of a batch fails with `exc`: None if that refuses them as content,
    else the kind of state it shows."""
    code = str(exc.sqlstate or "")
    if code.startswith(_CONTENT):
        return None
    return (
        state_kind(exc)
        or _SHARED_CODES.get(code)
        or _SHARED_CLASSES.get(code[:2])
        or f"sqlstate_{code or 'unknown'}"
    )


def database_kind(exc: BaseException) -> str | None:
    """The kind of database state behind a failed batch, or None when it is not one (a bug).

    A PostgreSQL error that escaped the message-by-message decision came from a statement
    that is not about one message (looking up duplicates, quarantining): the database's state.
    """
    if isinstance(exc, DatabaseState):
        return exc.kind
    if isinstance(exc, asyncpg.PostgresError):
        return shared_kind(exc) or f"sqlstate_{exc.sqlstate}"
    return state_kind(exc)


class DatabaseState(Exception):
    """The batch failed for the database's state, not its content; `kind` names which."""

    def __init__(self, kind: str, cause: BaseException) -> None:
        super().__init__(f"{kind}: {type(cause).__name__}: {cause}")
        self.kind = kind
        self.cause = cause


class DatabaseHealth:
    """What the last batches said about the database, for /readyz.

    A state failure stays the answer until a batch commits, or for `memory` seconds when no
    batch comes (a probe that kept a receiver out of rotation would otherwise keep it out).
    """

    def __init__(self, memory: float = 10.0) -> None:
        self.memory = memory
        self._failure: tuple[str, float] | None = None

    def failed(self, kind: str) -> None:
        self._failure = (kind, time.monotonic())

    def stored(self) -> None:
        self._failure = None

    def last_failure(self) -> tuple[str, float] | None:
        """(kind, seconds ago) of the last batch's state failure, while it is recent."""
        if self._failure is None:
            return None
        kind, at = self._failure
        ago = time.monotonic() - at
        return (kind, ago) if ago <= self.memory else None
