"""Fixed glibc malloc thresholds for a Python worker, so large buffers are reused.

A learner step allocates and frees dozens of [batch, catalogue] float tensors (2 MB at
256 x 2,040), the text encoder its activations. glibc serves blocks above its mmap
threshold (128 KB at start, raised as such blocks are freed) with fresh mappings and
gives a freed heap top above its trim threshold back to the OS, so such buffers are
faulted in again and again (minor page faults in the trainer's worker and in the worker
that embeds the catalogue). With fixed thresholds freed blocks stay in the heap for the
next step. Set once per worker process, by each stage's ``open``.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt() parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); blocks above it
# still get mappings of their own.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap kept for reuse before any is given back.
TRIM_THRESHOLD = 256 << 20


def keep_large_blocks() -> bool:
    """Set this process's mmap and trim thresholds; True when glibc took both.

    False (nothing changed) where the C library is not glibc: macOS, musl."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
