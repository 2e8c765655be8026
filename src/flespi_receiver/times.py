"""Times given on the command line: Unix seconds or ISO 8601, always made timezone-aware."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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


_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """`90` (seconds), `90s`, `30m`, `6h`, `7d` as a positive timedelta; TimeFormatError else."""
    value = text.strip().lower()
    number, unit = value, "s"
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(suffix):
            number, unit = value[: -len(suffix)], suffix
            break
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = -1
    if not 0 < seconds < 1e10:
        raise TimeFormatError(f"duration {text!r} is not like 90s, 30m, 6h or 7d")
    return timedelta(seconds=seconds)


def duration(seconds: float) -> str:
    """`42 s`, `7 min`, `3 h 5 min`, `2 d 4 h`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(int(minutes), 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
