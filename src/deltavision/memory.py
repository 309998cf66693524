"""Keeping a CPU process's resident memory close to what its tensors use.

The MIST edge trainer and feature service apply it by default (memory is the
edge's constraint), ``deltavision plan`` before it measures, and the
classification trainer with ``--low-memory``: there it cut the peak resident
memory of a compare run by 28-53% but made CPU steps 1.7-3x slower (full
fine-tuning, E3VA and SSF on Lite0 at 64 px), so it is not the trainer's default.

glibc's malloc adapts its mmap threshold upwards whenever a large mapped block
is freed, so later activation-sized blocks (19 MB for a batch of 32 ViT-B/16
feature maps) come from its heap, which fragments and is not handed back to
the system. Training the LAE on such features, peak RSS measured this way kept
climbing past 500 MB while the live tensors peaked near 230 MB. A fixed
threshold makes every block above it a private mapping that is unmapped as soon
as it is freed. The price is page faults: training steps measured about 40%
slower on 197 x 768 features (benchmarks/mist.py reports both settings).

The feature service applies it too: decoding a large image allocates tens of
megabytes that glibc would otherwise keep after the request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_THRESHOLD = 128 * 1024


def release_large_blocks(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve blocks of at least ``threshold`` bytes by mmap and unmap them on free (glibc only).

    Returns whether the setting took effect; elsewhere it does nothing, and nothing is changed when the
    environment says ``DELTAVISION_LOW_MEMORY=0`` (faster CPU steps, higher resident memory).
    """
    if not sys.platform.startswith("linux") or os.environ.get("DELTAVISION_LOW_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError, TypeError):
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux: VmHWM from /proc, which starts afresh in every new program. Not
    ru_maxrss: a child process inherits its parent's peak there, so a fresh
    worker started from a large parent would report the parent's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
