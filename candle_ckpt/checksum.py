"""CRC32 of files (zlib's polynomial), streamed in constant memory.

Uses `isal.isal_zlib.crc32` when isal imports (about 3x faster than zlib here, and the
same values, running value included), `zlib.crc32` otherwise. The file is mapped into
memory rather than read: reading into a Python buffer costs an extra copy, and a
misaligned one (bytearray, numpy) copies several times slower still.
"""

import mmap
import os
import zlib

try:
    from isal.isal_zlib import crc32 as _isal_crc32
except ImportError:  # isal is optional: fall back to the standard library
    _isal_crc32 = None

crc32 = _isal_crc32 or zlib.crc32
BACKEND = "isal" if _isal_crc32 else "zlib"

# Pages of the mapping are touched in slices of this size, so a progress callback
# can be called and the working set stays small (8 MiB measured fastest).
CHUNK_BYTES = 8 << 20


def crc32_file(path, progress=None, crc_function=None):
    """Return the CRC32 of the file at `path` as an int (same value as `zlib.crc32`).

    Args:
        path: the file.
        progress: optional callable, called with the number of bytes done so far.
        crc_function: the CRC32 function to use (default: isal if available, else zlib).
    """
    crc_function = crc_function or crc32
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            return 0
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
            view = memoryview(mapping)
            try:
                value = 0
                for start in range(0, size, CHUNK_BYTES):
                    value = crc_function(view[start:start + CHUNK_BYTES], value)
                    if progress is not None:
                        progress(min(start + CHUNK_BYTES, size))
            finally:
                view.release()
    return value
