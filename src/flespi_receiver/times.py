"""Times given on the command line: Unix seconds or ISO 8601, always made timezone-aware."""

from __future__ import annotations

from datetime import UTC, datetime

from flespi_receiver.errors import ReceiverError


class TimeFormatError(ReceiverError):
    """A time option is neither Unix seconds nor ISO 8601."""


def parse_time(text: str) -> datetime:
    """`1764000000`, `1764000000.5`, `2026-11-24`, `2026-11-24T10:00:00+02:00` as an aware
    datetime; an ISO time without an offset is UTC. Raises TimeFormatError with the fix."""
    value = text.strip()
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except ValueError:
        pass
    except (OverflowError, OSError):
        raise TimeFormatError(f"time {text!r} is out of range") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise TimeFormatError(
            f"time {text!r} is neither Unix seconds (1764000000) nor ISO 8601 "
            "(2026-11-24T10:00:00Z)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
