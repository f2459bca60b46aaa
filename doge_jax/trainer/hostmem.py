"""Keeps freed host memory inside the process on CPU-only machines.

XLA:CPU allocates a step's temporaries (a Doge-20M step at 4 × 512 touches ~1.2 GB: the [B·T, V] logits
alone are 268 MB) and frees them when the step ends. glibc returns such large blocks to the kernel (mmap'd
chunks, per-thread arenas, heap trimming), so the next step page-faults every page back in: ~300k minor
faults and ~0.5 s of kernel time per step, a quarter of the step on 2 cores. One arena, no mmap'd chunks
and no trimming make the memory stay and be reused: zero faults in steady state.

The cost is that the process keeps its peak host memory until it exits, which is what a training process
does anyway. It must run before XLA starts its threads (a thread keeps the arena it first used), so the entry
point calls it first thing; GPU/TPU hosts are left alone (their step temporaries live on the device).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # <malloc.h>


def has_accelerator() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def keep_freed_memory() -> bool:
    """glibc: one arena, no mmap'd chunks, never trim. Returns whether it applied (Linux glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # mallopt's value is an int; −1 converts to SIZE_MAX for the trim threshold: never give memory back.
        ok = (libc.mallopt(_M_ARENA_MAX, 1) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)
    except (OSError, AttributeError):
        return False
    if not ok:
        logging.warning("mallopt refused the host-memory settings; CPU steps will page-fault their temporaries")
    return ok
