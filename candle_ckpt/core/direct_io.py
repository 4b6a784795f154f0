"""Moving large buffers between memory and files without holding the GIL, for any framework.

A background save competes with training on the same cores. h5py holds the GIL for as
long as HDF5 writes a dataset, so the training thread, which needs the GIL between its
kernels, waits for each of those writes. The file formats therefore only lay the file
out (a few kilobytes of metadata, written by their own library) and leave the bulk of
the bytes to `write_at`, whose `os.pwrite` calls each release the GIL. The Keras h5
format uses it (`candle_ckpt.keras.h5.write`); the PyTorch adapter can do the same with
the offsets of any layout it writes.

`anonymous_memory` is where snapshots and restart reads live: page-aligned private
memory (snapshots in huge pages), so that filling it is not dominated by page faults.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable

from .faults import fault_point

# One pwrite per piece: short enough that the progress callback (writeback start) runs
# often, long enough that the per-call cost vanishes.
PIECE_BYTES = 8 << 20


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


def write_at(
    path: str,
    regions: Iterable[tuple[int, memoryview]],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write each (offset, bytes) of `regions` into the existing file `path`, in place.

    The file is neither created nor truncated: its layout (where each region goes) was
    made by whoever created it. Short writes are continued; the GIL is released during
    every write. Nothing is fsynced: the save protocol fsyncs every file of the epoch
    before it renames the epoch into place, so a process killed during or after these
    writes leaves no epoch that holds them half-written.

    Args:
        path: the file.
        regions: (file offset, C-contiguous buffer) pairs, in any order.
        progress: called with the bytes written so far after every piece (e.g. a
            `durable.WritebackStarter`).

    Returns:
        The number of bytes written.

    Raises:
        OSError: a write failed (ENOSPC, EIO), naming `path`.
    """
    fd = os.open(path, os.O_WRONLY)
    written, regions_written = 0, 0
    try:
        for offset, buffer in regions:
            view = memoryview(buffer).cast("B")
            done = 0
            while done < len(view):
                try:
                    done += os.pwrite(fd, view[done : done + PIECE_BYTES], offset + done)
                except OSError as error:
                    raise OSError(error.errno, error.strerror, path) from error
                if progress is not None:
                    progress(written + done)
            written += done
            regions_written += 1
            if regions_written == 1:
                fault_point("during_direct_write")
    finally:
        os.close(fd)
    return written
