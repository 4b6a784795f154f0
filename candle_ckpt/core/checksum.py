"""CRC32 of files (zlib's polynomial): streamed in constant memory, or while reading a
file into memory.

Uses `isal.isal_zlib.crc32` when isal imports (faster than zlib, and the same values,
running value included), `zlib.crc32` otherwise. `crc32_file` maps the file into
memory rather than reading it: reading into a Python buffer costs an extra copy, and a
misaligned one (bytearray, numpy) a slower one still. `read_file` is for a file about
to be used whole (a restart's model file): it reads it once into a page-aligned buffer
and checksums each chunk in a second thread while the next one is read, so the CRC
adds little on top of the read. benchmarks/bench_checksum.py measures each of these
claims (isal against zlib, the halves against one thread, reading with and without the
CRC, into aligned memory against a bytearray).
"""

from __future__ import annotations

import concurrent.futures
import mmap
import os
from collections.abc import Callable

from .background import SharedThread
from .direct_io import anonymous_memory

Progress = Callable[[int], None]
"""progress(bytes_done), called as a long file is checksummed."""
CrcFunction = Callable[..., int]
"""crc(data, running_value=0) -> int, as `zlib.crc32`."""

_crc32_combine: Callable[[int, int, int], int] | None
try:
    from isal.isal_zlib import crc32
    from isal.isal_zlib import crc32_combine as _crc32_combine

    BACKEND = "isal"
except ImportError:  # isal is optional: fall back to the standard library
    from zlib import crc32

    _crc32_combine = None
    BACKEND = "zlib"

# Pages of the mapping are touched in slices of this size, so a progress callback
# can be called and the working set stays small (benchmarks/bench_checksum.py
# --chunk-mib compares another size).
CHUNK_BYTES = 8 << 20

# `read_file` reads the last CHUNK_BYTES of a file in pieces of this size: the CRC of
# the last piece is the only one no read overlaps, so it is kept short.
LAST_PIECE_BYTES = 1 << 20

# From this size on, isal's CRC runs on both halves of the file at once (it releases the
# GIL) and combines them; below it, a second thread costs more than it saves.
PARALLEL_MIN_BYTES = 64 << 20

# The one extra thread CRCs run in; a single worker runs its tasks in order.
crc_thread = SharedThread("candle_ckpt-crc")


def crc32_file(
    path: str, progress: Progress | None = None, crc_function: CrcFunction | None = None
) -> int:
    """Return the CRC32 of the file at `path` as an int (same value as `zlib.crc32`).

    Args:
        path: the file.
        progress: optional callable, called with the number of bytes done so far.
        crc_function: the CRC32 function to use (default: isal if available, else zlib).

    Files of PARALLEL_MIN_BYTES or more are checksummed in two threads when isal is the
    function and there is no progress callback.
    """
    parallel = progress is None and crc_function is None and _crc32_combine is not None
    crc_function = crc_function or crc32
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            return 0
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
            view = memoryview(mapping)
            try:
                if parallel and size >= PARALLEL_MIN_BYTES:
                    return _crc32_halves(view, size)
                return _crc32_range(view, 0, size, crc_function, progress)
            finally:
                view.release()


def read_file(path: str, compute_crc: bool = True) -> tuple[memoryview, int | None]:
    """Read the whole file at `path` into memory; return (contents, CRC32 or None).

    `contents` is a read-only memoryview of the bytes read, in a page-aligned anonymous
    mapping (shorter than the file was at open only if it shrank meanwhile). The CRC32,
    computed when `compute_crc` is true, equals `zlib.crc32(contents)` and is computed over
    exactly these bytes: what the caller verifies is what it uses.
    """
    with open(path, "rb", buffering=0) as stream:
        size = os.fstat(stream.fileno()).st_size
        # New memory at every restart: huge pages would risk a compaction stall
        view = memoryview(anonymous_memory(size, huge_pages=False))
        running = [0]

        def add_to_crc(begin: int, end: int) -> None:  # in the CRC thread, chunk by chunk
            running[0] = crc32(view[begin:end], running[0])

        pending: list[concurrent.futures.Future[None]] = []
        filled = 0
        while filled < size:
            step = CHUNK_BYTES if size - filled > CHUNK_BYTES else LAST_PIECE_BYTES
            count = stream.readinto(view[filled : min(filled + step, size)])
            if not count:
                break
            if compute_crc:
                pending.append(crc_thread.submit(add_to_crc, filled, filled + count))
            filled += count
        for chunk in pending:
            chunk.result()
    return view[:filled].toreadonly(), running[0] if compute_crc else None


def _crc32_range(
    view: memoryview,
    start: int,
    stop: int,
    crc_function: CrcFunction,
    progress: Progress | None = None,
) -> int:
    value = 0
    for begin in range(start, stop, CHUNK_BYTES):
        end = min(begin + CHUNK_BYTES, stop)
        value = crc_function(view[begin:end], value)
        if progress is not None:
            progress(end)
    return value


def _crc32_halves(view: memoryview, size: int) -> int:
    assert _crc32_combine is not None  # only called when isal imported
    middle = (size // 2) & ~(mmap.PAGESIZE - 1)
    second = crc_thread.submit(_crc32_range, view, middle, size, crc32)
    first = _crc32_range(view, 0, middle, crc32)
    return _crc32_combine(first, second.result(), size - middle)
