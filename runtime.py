"""Process-wide settings for running models on a CPU, applied once by the ``tbps`` program.

glibc's allocator serves each large block (a batch's activations: tens of MB) from a fresh
``mmap`` and returns freed memory at the heap's top to the OS once more than a small threshold is
free. A forward pass allocates and frees such blocks for every layer, so the pages are mapped,
zero-filled by the kernel on first touch, and unmapped again, batch after batch.

:func:`hold_freed_memory` raises both thresholds, so freed activations stay in the heap and the
next batch reuses them. This is the "use a caching allocator" advice of PyTorch's CPU
performance guide (jemalloc or tcmalloc through ``LD_PRELOAD``) done with glibc's own knobs, so
nothing needs preloading. Measured with tbps-tiny on the 2-core development machine:

- model alone, fresh processes: 398 -> 501 pairs/s, 170 -> 7 page faults per pair
  (``bench/score.py``, bench/RESULTS.md);
- ``tbps score`` of 20,000 pairs, two runs each: 65 and 72 s with glibc's defaults, 64.6 and
  64.1 s with memory kept; peak RSS 1,270 and 1,496 MiB against 1,519 and 1,850 MiB. The price is
  freed memory kept, up to ``TRIM_THRESHOLD`` per heap and process (forked DataLoader workers
  inherit the setting); the peak stays flat in the number of pairs.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit: blocks above it are still mapped
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top before any is returned

# A user who set glibc's own environment variables, or preloaded another allocator, has chosen.
_USER_CHOICE = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def hold_freed_memory() -> bool:
    """Make glibc keep freed large blocks for reuse instead of unmapping them (see the module doc).

    Does nothing outside Linux with glibc, when glibc's ``MALLOC_*`` variables or
    ``GLIBC_TUNABLES=glibc.malloc.*`` are set, or when another allocator is preloaded.

    Returns:
        Whether the settings were applied.
    """
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _USER_CHOICE):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):  # glibc's newer way to set the same
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt does nothing
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def offline_by_default() -> bool:
    """Keep Hugging Face Hub (open_clip's and transformers' downloader) offline unless ``TBPS_ALLOW_DOWNLOAD=1``.

    Must run before huggingface_hub is imported: it reads the variable once, at import.

    Returns:
        Whether the process is now offline.
    """
    if os.environ.get("TBPS_ALLOW_DOWNLOAD") == "1":
        return False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return os.environ["HF_HUB_OFFLINE"] == "1"
