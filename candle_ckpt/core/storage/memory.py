"""Memory for large buffers, and the thread that fills them beside the caller.

`anonymous_memory` is where snapshots and restart reads live: page-aligned private
memory (snapshots in huge pages), so that filling it is not dominated by page faults,
and so that an array carved out of it on an ALIGNMENT boundary is written by O_DIRECT
straight from where it is (`direct_io.write_at`). `copy_thread` copies or maps in the
part of a buffer the caller does not: `direct_io.copy_into` and a restart's read
(`checksum.read_file`).
"""

from __future__ import annotations

import mmap

from .background import SharedThread

copy_thread = SharedThread("candle_ckpt-copy")


class PrivateMemory(mmap.mmap):
    """Memory `anonymous_memory` made: no file behind it and no other process sharing it,
    so whoever holds it may write into it (a restart builds tensors on it in place)."""


def anonymous_memory(size: int, huge_pages: bool = True) -> PrivateMemory:
    """`size` bytes of private, zeroed, page-aligned memory: fewer page faults to fill
    than shared memory or a bytearray (benchmarks/bench_checksum.py, read_only against
    read_bytearray).

    `huge_pages` asks for huge pages (MADV_HUGEPAGE), fewer faults still, for memory
    filled once and reused (snapshots). Under the common THP setting `defrag=madvise` the
    kernel then compacts memory synchronously on the first touch when it is fragmented,
    which can stall the filling thread for longer than the faults it saves: memory
    allocated anew each time (a restart's read) is better off without.
    """
    mapping = PrivateMemory(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping
