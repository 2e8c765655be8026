"""The errors a user can cause, each with a message that names the cause and the fix."""

from __future__ import annotations


class ReceiverError(Exception):
    """Base of every error the receiver reports to its user instead of a traceback."""

    # the command line's exit status when this error ends a command
    exit_code = 1


class ConfigError(ReceiverError):
    """The configuration file or environment is invalid."""

    exit_code = 2


class UsageError(ReceiverError):
    """A command's argument can't be used as given (an output file that can't be written)."""

    exit_code = 2


class EmbeddedServerBusy(ReceiverError):
    """The embedded PostgreSQL's data folder is owned by another running receiver."""

    exit_code = 2


class CommandFailed(ReceiverError):
    """A command could not do its job; the message says why and what to do."""


class BatchRejected(ReceiverError):
    """A stream in `on_invalid = "reject"` mode got content that can't be stored as it is."""

    def __init__(self, reason: str, *, whole_body: bool = False) -> None:
        # the first line only: PostgreSQL's DETAIL may quote the refused row, payload and all,
        # and this reason is the reply's and the log line's
        super().__init__(reason.split("\n", 1)[0])
        # the body as a whole is not a JSON array (400), rather than a bad message in it (422)
        self.whole_body = whole_body


class BodyError(ReceiverError):
    """The request body could not be read whole; raised inside the batch's transaction, which
    rolls back cleanly (the connection stays usable)."""


class BodyTooLarge(BodyError):
    """The request body grew past server.max_body_size (counted after decompression)."""


class BodyTimeout(BodyError):
    """The request body did not arrive within server.body_timeout."""


class ShutdownTimeout(BodyError):
    """The receiver is stopping and server.shutdown_timeout passed before the body arrived."""


class BodyTooBusy(BodyError):
    """A body needed more of the memory for bodies in flight than it held (body_slots.py) and
    no room came within database.acquire_timeout, or could ever come (every slot held by
    bodies waiting for more)."""


class BodyIncomplete(BodyError):
    """The body broke off (the client went away) or can't be decompressed."""


def drop_frames(exc: BaseException) -> None:
    """Let go of the frames `exc` and the exceptions chained to it hold.

    asyncio keeps an exception in the future it ended (asyncio.wait_for's inner task, for one),
    that future sits in a frame of the exception's own traceback: a cycle, which keeps every
    frame of the traceback alive, and with them a body's chunks and what was made of them,
    until the garbage collector's rare full collection. Call it where such an exception is
    handled and done with.
    """
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]
