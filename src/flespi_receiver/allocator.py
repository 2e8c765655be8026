"""Large blocks of memory go back to the system when they are freed (glibc's malloc).

glibc serves a block over its mmap threshold (128 KiB at start) with a mapping of its own, and
unmaps it when it is freed; but each time such a block is freed it raises the threshold to that
block's size (up to 32 MiB), so the next bodies' pieces come from the heap, where freed memory
stays with the process and is not reused in the same shapes: the receiver's peak memory then
creeps past what its bodies in flight hold (`server.bodies_in_flight`). A threshold set
explicitly is never moved (mallopt(3), M_MMAP_THRESHOLD).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3): M_MMAP_THRESHOLD, and glibc's initial value of it (bytes)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def keep_large_blocks_apart() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD; False where the C library is not glibc
    (or refuses), which changes nothing else."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
