"""What the pydantic model of a message's known fields costs, next to a measured receiver rate.

The receiver's rate comes from `flespi-receiver bench`; the model is timed here, in the same
run, on sample messages of the same generator and fleet, exactly as the receiver calls it
(MessageFields.columns on each parsed message). Its share of the receiver's time per message
is the most the receiver/COPY ratio could rise without it: ratio x share.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from flespi_receiver.fields import DEFAULT_FIELDS

_REPEATS = 5


def model_cost(encoded: list[bytes], receiver_rate: float, ratio_to_copy: float) -> dict[str, Any]:
    """Microseconds the known-field model takes per message (best of _REPEATS passes over
    `encoded`), its share of the receiver's seconds per message (1 / `receiver_rate`, msg/s),
    and what it takes off `ratio_to_copy` (receiver/COPY)."""
    pairs = [(orjson.loads(raw), raw) for raw in encoded]
    columns = DEFAULT_FIELDS.columns
    best = float("inf")
    for _ in range(_REPEATS):
        started = time.perf_counter()
        for data, raw in pairs:
            columns(data, raw)
        best = min(best, (time.perf_counter() - started) / len(pairs))
    share = best * receiver_rate
    return {
        "model_us_per_message": round(best * 1e6, 2),
        "model_share_of_receiver": round(share, 4),
        "ratio_lowered_by": round(ratio_to_copy * share, 4),
    }
