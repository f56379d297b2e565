# Copyright (c) SAM-PARSER for MONAI contributors. Licensed under the Apache License, Version 2.0.
"""Keep the memory freed by CPU tensors inside the process, so the next training step reuses it.

PyTorch's CPU allocator takes every tensor from ``malloc`` and gives it back with ``free``. glibc serves large blocks
with ``mmap`` and returns them, and the top of its heap, to the operating system on ``free``; the next step asks for
the same blocks again and the kernel maps and zeroes every page anew. On this project's 2-core CPU that was about
1.6 million page faults and 4.7 s of kernel time in a 9 s LiteMedSAM training step (``encoder`` preset, batch 2):
see ``docs/benchmarks.md``, "Host memory between steps". Keeping the blocks makes later steps fault nothing.

The cost is that the process keeps its peak host memory until it exits, a third to a half more than without (heap
fragmentation; +33% for that training step, +48% for inference), which a training, evaluation or inference process
needs again at its next step or request anyway. Where host memory is the limit (a large batch on a CPU), leave it
off: the bundle's ``retain_host_memory`` false, ``--release-host-memory`` of the scripts, ``--conf
retain_host_memory false`` of the MONAI Label app. This is what the PyTorch CPU performance guides get from
jemalloc or tcmalloc, without preloading another allocator.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_host_memory"]

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: the largest trim threshold it accepts, 2 GiB of free heap top before any is returned.
_NEVER_TRIM = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    """The C library of this process where it is glibc (the only one whose ``mallopt`` means this), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def retain_freed_host_memory(enabled: bool = True) -> bool:
    """Make glibc keep freed blocks in the process: no ``mmap`` for large blocks, no trimming of the heap.

    Process-wide and lasting; DataLoader workers forked afterwards inherit it. Numerics do not change, only where
    the allocator finds memory. Call it once at the start of a training or evaluation run (the bundle's
    ``initialize`` does, unless ``retain_host_memory`` is false).

    Args:
        enabled: False leaves the allocator as it is and returns False, so a config can switch it off.

    Returns:
        True where the setting was applied (Linux with glibc), False where nothing changed.
    """
    if not enabled:
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
