"""How this process's large tensors get their memory: glibc's heap kept for reuse.

torch allocates CPU tensors with malloc. glibc serves a block above its mmap threshold (128 KiB, raised as
blocks are freed, at most 32 MiB) with a fresh mmap, and gives it back with munmap when freed; the next
tensor of that size starts again from untouched pages, and its first write takes a page fault per 4 KiB
(kernel time, zeroing). A prefill makes its activations anew for each layer: the Jamba-3B shape's
512-token bf16 prefill spent 13-17% of its time in the kernel this way and ran at 151-169 tok/s on its
first measured pass, ~250 only once glibc had raised its threshold past the sizes in use; with the heap
kept (blocks up to MMAP_THRESHOLD from the heap, and up to TRIM_THRESHOLD of free memory at its top not
given back) 241-265 from the first pass (Sapphire Rapids, 2 threads: benchmarks/results/allocator.md).

The cost: up to TRIM_THRESHOLD of freed memory stays resident for reuse, as llama.cpp keeps its compute
buffers. Blocks above MMAP_THRESHOLD (a whole model's weights are many smaller tensors; this is for one
tensor) still come from mmap and go back when freed.

Applied when hybridlm is imported, unless the process chose its own allocator or malloc settings
(LD_PRELOAD, MALLOC_*_ variables, GLIBC_TUNABLES' glibc.malloc); kernels.report() says which applies.
"""
from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 256 << 20     # bytes: blocks up to this come from the heap
TRIM_THRESHOLD = 512 << 20     # bytes of free memory at the heap's top kept for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters (malloc.h)
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")

state = "not applied yet"


def user_choice() -> str | None:
    """What the environment chose for malloc, if anything (then hybridlm leaves it alone)."""
    chosen = [f"{k}={os.environ[k]}" for k in _USER_SETTINGS if k in os.environ]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES=" + os.environ["GLIBC_TUNABLES"])
    if os.environ.get("LD_PRELOAD"):
        chosen.append("LD_PRELOAD=" + os.environ["LD_PRELOAD"])
    return ", ".join(chosen) or None


def keep_heap() -> str:
    """Set glibc's mmap and trim thresholds (see the module doc) unless the environment chose otherwise.
    Returns (and keeps in ``state``) a line saying what applies."""
    global state
    chosen = user_choice()
    if chosen:
        state = f"as the environment sets: {chosen}"
        return state
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        state = "the platform's malloc (not glibc: no mallopt)"
        return state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    state = (f"glibc heap kept for reuse (blocks up to {MMAP_THRESHOLD >> 20} MiB from the heap, up to "
             f"{TRIM_THRESHOLD >> 20} MiB of free memory kept; set by hybridlm: fresh pages per tensor cost a page "
             "fault per 4 KiB)" if ok else "the C library's malloc defaults (mallopt refused the thresholds)")
    return state
