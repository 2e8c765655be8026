"""A log processor that keeps secrets out of every log line, the libraries' lines included.

The receiver never logs a token or password on purpose, but other code may quote what it was
sent: aiohttp prints a malformed header line as received, so `Authorization: Bearer <token>`
followed by a stray control character would put the token in its error. This processor
replaces every known secret (the streams' `authorization` values, their token part, and the
database password) wherever it appears in a log line, makes every string encodable, so
that no header can make a log line fail, and cuts every string to MAX_STRING characters, so
that bytes a client sends and a library quotes can't make one line huge.
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any

MASK = "********"
# shorter values would mask ordinary words; configured tokens are far longer
MIN_SECRET = 6
# a log value longer than this is cut (after masking, so no secret is cut in half and shown)
MAX_STRING = 2000


def _variants(secret: str) -> set[str]:
    """The secret as it may appear: whole, its token without the scheme, and as repr() shows
    it inside the printed bytes of a header line."""
    found = {secret}
    token = secret.partition(" ")[2]
    if token.strip():
        found.add(token.strip())
    found |= {repr(value)[1:-1] for value in list(found)}
    found |= {repr(value.encode("utf-8", "surrogateescape"))[2:-1] for value in list(found)}
    return {value for value in found if len(value) >= MIN_SECRET}


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a header of invalid UTF-8
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class SecretRedactor:
    """structlog processor: known secrets become MASK in every string of the event."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def add(self, secrets: Iterable[str]) -> None:
        """Remember more secrets (old ones are kept: a rotated token stays masked)."""
        known = set(self._secrets)
        for secret in secrets:
            if secret:
                known |= _variants(secret)
        # longest first, so that a token inside its "Bearer <token>" is masked as a whole
        self._secrets = tuple(sorted(known, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if len(text) > MAX_STRING:
            text = f"{text[:MAX_STRING]}... ({len(text) - MAX_STRING} more characters)"
        return _encodable(text)

    def clean(self, value: Any) -> Any:
        """`value` (strings, and dicts, lists, tuples of them) with every secret masked."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self.clean(k): self.clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.clean(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.clean(v) for v in value)
        return value

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        cleaned: dict[str, Any] = self.clean(dict(event_dict))
        return cleaned


# the one redactor of the process: configured by `configure_logging`, fed on start and SIGHUP
REDACTOR = SecretRedactor()
