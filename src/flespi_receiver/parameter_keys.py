"""The digest of a payload's keys, as the SQL function parameter_keys()
(schema/0011_device_state_pointer.sql) computes it: merge mode compares a batch's parameters
with a device state's by it, without reading either payload."""

from __future__ import annotations

import functools
import hashlib


@functools.lru_cache(maxsize=4096)
def parameter_keys(keys: tuple[str, ...]) -> bytes:
    """What parameter_keys() gives in PostgreSQL for a payload with these keys: SHA-256 of the
    keys sorted bytewise (code points sort as their UTF-8 bytes do), each as its length in
    characters, ':' and itself. Cached: a fleet's messages have few sets of keys."""
    return hashlib.sha256("".join(f"{len(key)}:{key}" for key in sorted(keys)).encode()).digest()
