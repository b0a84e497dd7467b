"""Keep freed tensor memory in the process, so a training step does not page-fault its activations back.

glibc's malloc hands every block above its mmap threshold (128 KiB at start) to a fresh `mmap` and
returns it with `munmap` when freed, and trims the top of the heap once more than its trim threshold
is free there. A training step allocates and frees the same activations every step, so by default
each step maps them again: about 1,000 minor page faults per step at nanoGPT's CPU recipe (measured
with `getrusage`), and every `munmap` makes the kernel stop the other OpenMP threads to flush their
TLBs. Fixing the mmap threshold at 32 MiB (glibc's 64-bit maximum) and the trim threshold at
256 MiB keeps those blocks in the heap for the next step: 13-20 faults per step, and `tcompare train`
at that recipe 12-15% faster and steadier (docs/results.md, "Session 6"). The cost is that up to
256 MiB freed at the top of the heap stays with the process. Nothing computed changes.

Called once by every command that trains or times a model; a no-op where the C library is not glibc
(macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has gnu_get_libc_version and mallopt), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (above); True if both were set, False where unsupported."""
    libc = glibc()
    if libc is None:
        return False
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(mmap_set and trim_set)
