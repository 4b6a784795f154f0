"""CRC32 of files (zlib's polynomial): streamed in constant memory, or while reading a
file into memory.

Uses `isal.isal_zlib.crc32` when isal imports (about 3x faster than zlib here, and the
same values, running value included), `zlib.crc32` otherwise. `crc32_file` maps the
file into memory rather than reading it: reading into a Python buffer costs an extra
copy, and a misaligned one (bytearray, numpy) copies several times slower still.
`read_file` is for a file about to be used whole (a restart's model file): it reads it
once into a page-aligned buffer and checksums each chunk in a second thread while the
next one is read, so the CRC costs almost nothing on top of the read (300 MB: 46 ms to
read, 48-50 ms to read and checksum; the CRC alone over a mapping takes 13-25 ms).
"""

import concurrent.futures
import mmap
import os
import threading
from collections.abc import Callable

from .direct_io import anonymous_memory

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
# can be called and the working set stays small (8 MiB measured fastest).
CHUNK_BYTES = 8 << 20

# `read_file` reads the last CHUNK_BYTES of a file in pieces of this size: the CRC of
# the last piece is the only one no read overlaps, so it is kept short.
LAST_PIECE_BYTES = 1 << 20

# From this size on, isal's CRC runs on both halves of the file at once (it releases the
# GIL) and combines them: 16 GiB/s instead of 10 on this machine's 2 cores, idle.
PARALLEL_MIN_BYTES = 64 << 20
_second_threads: dict = {}  # {nice value of the threads asking: their CRC thread}
_second_thread_lock = threading.Lock()


def crc32_file(path, progress=None, crc_function=None):
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


def read_file(path, checksum=True):
    """Read the whole file at `path` into memory; return (contents, CRC32 or None).

    `contents` is a read-only memoryview of the bytes read, in a page-aligned anonymous
    mapping (shorter than the file was at open only if it shrank meanwhile). The CRC32,
    computed when `checksum` is true, equals `zlib.crc32(contents)` and is computed over
    exactly these bytes: what the caller verifies is what it uses.
    """
    with open(path, "rb", buffering=0) as stream:
        size = os.fstat(stream.fileno()).st_size
        view = memoryview(anonymous_memory(size))
        running = [0]

        def add_to_crc(begin, end):  # runs in the CRC thread, one chunk after another
            running[0] = crc32(view[begin:end], running[0])

        pending, filled = [], 0
        while filled < size:
            step = CHUNK_BYTES if size - filled > CHUNK_BYTES else LAST_PIECE_BYTES
            count = stream.readinto(view[filled:min(filled + step, size)])
            if not count:
                break
            if checksum:
                pending.append(_crc_thread().submit(add_to_crc, filled, filled + count))
            filled += count
        for chunk in pending:
            chunk.result()
    return view[:filled].toreadonly(), running[0] if checksum else None


def _crc_thread():
    """The extra thread the calling thread's CRCs run in; a single worker runs its tasks
    in order.

    One per nice value, started by (and so inheriting the priority of) the first
    thread of that value to ask: a background save's CRC must not run at the training
    thread's priority because a restart's read started the helper first.
    """
    nice = _thread_nice()
    with _second_thread_lock:
        if nice not in _second_threads:
            _second_threads[nice] = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="candle_ckpt-crc")
        executor = _second_threads[nice]
    return executor


def _thread_nice():
    """The calling thread's nice value (Linux sets it per thread), or 0 where unknown."""
    if not hasattr(os, "getpriority") or not hasattr(threading, "get_native_id"):
        return 0
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return 0


def _crc32_range(view, start, stop, crc_function, progress=None):
    value = 0
    for begin in range(start, stop, CHUNK_BYTES):
        end = min(begin + CHUNK_BYTES, stop)
        value = crc_function(view[begin:end], value)
        if progress is not None:
            progress(end)
    return value


def _crc32_halves(view, size):
    middle = (size // 2) & ~(mmap.PAGESIZE - 1)
    second = _crc_thread().submit(_crc32_range, view, middle, size, crc32)
    first = _crc32_range(view, 0, middle, crc32)
    return _crc32_combine(first, second.result(), size - middle)
