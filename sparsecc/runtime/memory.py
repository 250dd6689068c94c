"""Process-wide allocator setting that keeps freed memory for reuse (glibc ``mallopt``).

Measured on MiniLM batch 8 (1 thread, CPU time): every forward page-faulted ~15,800
fresh pages (~62 MB) because glibc hands large freed blocks back to the kernel
(mmap'd blocks and heap trimming), so the next op's output is zero-filled by the
kernel again: 35 ms of system time per forward, the same for torch dense (374 ms)
and sparsecc (142 ms), i.e. a quarter of sparsecc's time. A standalone benchmark
that calls one kernel in a loop never sees it (glibc reuses the block), one reason
the kernels looked ~1.7x slower inside the model than alone.
:func:`keep_freed_memory` (or ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in
the environment) removed the faults: 0 system ms, sparsecc 142 -> 105 ms, torch
dense 374 -> 308 ms. It affects the whole process (torch too), so it is opt-in.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it (glibc); False where not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    return ok
