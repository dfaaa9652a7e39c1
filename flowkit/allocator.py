"""Keep the C heap from handing freed tensor memory back to the kernel between steps (Linux/glibc).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its *mmap
threshold* (128 KiB at start, raised adaptively) with a fresh ``mmap`` and unmaps it on
``free``, and it returns the top of the heap to the kernel once more than the *trim
threshold* is free there. A training step allocates and frees the same few-hundred-KiB
activations hundreds of times, so both rules turn every allocation into new pages the
kernel must zero and map on first touch: on a 2-core EPYC that was a fifth of a DiffFlow
step (``bench/diffflow_timing.py``).

:func:`tune_cpu_allocator` raises both thresholds with ``mallopt`` so such blocks are
reused from the heap. Peak memory is unchanged (the heap holds what the step needs at its
peak either way); the process simply keeps up to ``trim_threshold`` bytes of freed heap
for reuse instead of returning them at once. Blocks above ``mmap_threshold`` are still
mapped and unmapped individually. Nothing happens off glibc, or when the user has set any
``MALLOC_*`` tuning variable in the environment (theirs wins).

The trainer calls it once (``train.tune_allocator``, on by default); library users may call
it themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_applied: dict[str, int] = {}


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Set glibc's mmap threshold and trim threshold (bytes) for this process.

    Returns True when the settings are in effect (now or from an earlier call), False where
    they do not apply: not Linux/glibc, or ``MALLOC_*`` variables already chosen by the user.
    """
    if _applied == {"mmap": mmap_threshold, "trim": trim_threshold}:
        return True
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    if ok:
        _applied.update(mmap=mmap_threshold, trim=trim_threshold)
    return ok
