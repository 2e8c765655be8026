"""Progress bars for long commands: on a terminal only, so piped output stays machine-readable."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(total: int | None, unit: str, description: str) -> tqdm[Any]:
    """A bar on stderr (count, rate, elapsed, what is being done); silent unless stderr is a
    terminal. Update with `.update(n)`, say what is next with `.set_description(text)`."""
    return tqdm(
        total=total,
        unit=f" {unit}",
        desc=description,
        disable=not sys.stderr.isatty(),
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )
