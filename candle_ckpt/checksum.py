"""CRC32 of files (zlib's polynomial), streamed in constant memory.

Uses `isal.isal_zlib.crc32` when isal imports (about 3x faster than zlib here, and the
same values, running value included), `zlib.crc32` otherwise. The file is mapped into
memory rather than read: reading into a Python buffer costs an extra copy, and a
misaligned one (bytearray, numpy) copies several times slower still.
"""

import concurrent.futures
import mmap
import os
import threading
import zlib

try:
    from isal.isal_zlib import crc32 as _isal_crc32
    from isal.isal_zlib import crc32_combine as _crc32_combine
except ImportError:  # isal is optional: fall back to the standard library
    _isal_crc32 = _crc32_combine = None

crc32 = _isal_crc32 or zlib.crc32
BACKEND = "isal" if _isal_crc32 else "zlib"

# Pages of the mapping are touched in slices of this size, so a progress callback
# can be called and the working set stays small (8 MiB measured fastest).
CHUNK_BYTES = 8 << 20

# From this size on, isal's CRC runs on both halves of the file at once (it releases the
# GIL) and combines them: 16 GiB/s instead of 10 on this machine's 2 cores, idle.
PARALLEL_MIN_BYTES = 64 << 20
_second_thread = None
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


def _crc32_range(view, start, stop, crc_function, progress=None):
    value = 0
    for begin in range(start, stop, CHUNK_BYTES):
        end = min(begin + CHUNK_BYTES, stop)
        value = crc_function(view[begin:end], value)
        if progress is not None:
            progress(end)
    return value


def _crc32_halves(view, size):
    global _second_thread
    with _second_thread_lock:
        if _second_thread is None:
            _second_thread = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="candle_ckpt-crc")
    middle = (size // 2) & ~(mmap.PAGESIZE - 1)
    second = _second_thread.submit(_crc32_range, view, middle, size, crc32)
    first = _crc32_range(view, 0, middle, crc32)
    return _crc32_combine(first, second.result(), size - middle)
