"""Keep freed host memory in the heap, so large CPU tensors do not page-fault on every step."""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30


def keep_freed_memory():
    """Raise glibc's mmap and trim thresholds to 1 GiB; return whether it took effect.

    By default glibc serves each block over 32 MiB (a CPU step's logits are hundreds of MB)
    with a fresh mmap and unmaps it on free, so every step faults its pages in again; on
    2 CPU cores that cost a quarter of the step time. Elsewhere (no glibc) this does nothing.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))
