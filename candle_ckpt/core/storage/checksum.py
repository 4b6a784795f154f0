"""CRC32 of files (zlib's polynomial): streamed in constant memory, while reading a file
into memory, or from the memory a file is written from (`WrittenFileCrc`).

Uses `isal.isal_zlib.crc32` when isal imports (faster than zlib, and the same values,
running value included), `zlib.crc32` otherwise. `crc32_file` maps the file into
memory rather than reading it: reading into a Python buffer costs an extra copy, and a
misaligned one (bytearray, numpy) a slower one still. `read_file` is for a file about
to be used whole (a restart's model file): it reads it once into a page-aligned buffer
and checksums each chunk in a second thread while the next one is read, so the CRC
adds little on top of the read. benchmarks/bench_checksum.py measures each of these
claims (isal against zlib, the halves against one thread, reading with and without the
CRC, into aligned memory against a bytearray).

`WrittenFileCrc` is for a file `direct_io.write_at` writes with O_DIRECT, whose bytes
never enter the page cache: reading it back would read the disk.
"""

from __future__ import annotations

import concurrent.futures
import errno
import functools
import mmap
import os
import resource
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from .background import SharedThread, available_memory_bytes
from .memory import anonymous_memory, copy_thread

Progress = Callable[[int], None]
"""progress(bytes_done), called as a long file is checksummed."""
CrcFunction = Callable[..., int]
"""crc(data, running_value=0) -> int, as `zlib.crc32`."""
Regions = Sequence[tuple[int, Any]]
"""(file offset, writable C-contiguous buffer) pairs: parts of a file to read into
memory the caller has, rather than into new memory."""


@dataclass(frozen=True)
class RegionPlanner:
    """`read_file`'s `read_into`: `plan(path, opened file)` -> the `Regions` of the
    file it reads. `rest_in_new_memory`: the caller's buffers take only part of the
    file (a restarting PyTorch optimizer has no tensors yet), so the new memory for the
    rest is mapped in while the first pass runs. `min_file_bytes`: a file smaller than
    this (or than IN_PLACE_MIN_BYTES) is read whole into new memory, where the caller
    found the two passes to cost more than the memory they spare."""

    plan: Callable[[str, BinaryIO], Regions]
    rest_in_new_memory: bool = False
    min_file_bytes: int = 0


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

# From this size on, `read_file` reads regions into the caller's memory (`read_into`);
# below it, what that adds (the file mapped and checksummed before it is read, and the
# caller's planning) costs more than the new memory it spares, from the page cache and
# from the disk alike.
IN_PLACE_MIN_BYTES = 64 << 20

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
    with open(path, "rb") as stream:
        return _mapped_crc32(stream.fileno(), progress, crc_function)


def _mapped_crc32(
    fd: int, progress: Progress | None = None, crc_function: CrcFunction | None = None
) -> int:
    """`crc32_file` of the open file `fd`, from its first byte whatever its position."""
    parallel = progress is None and crc_function is None and _crc32_combine is not None
    crc_function = crc_function or crc32
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapping:
        view = memoryview(mapping)
        try:
            if parallel and size >= PARALLEL_MIN_BYTES:
                return _crc32_halves(view, size)
            return _crc32_range(view, 0, size, crc_function, progress)
        finally:
            view.release()


def read_file(
    path: str,
    compute_crc: bool = True,
    read_into: RegionPlanner | None = None,
    expected_crc: int | None = None,
) -> tuple[memoryview, int | None]:
    """Read the whole file at `path` into memory; return (contents, CRC32 or None).

    `contents` is a read-only memoryview of the bytes read, in a page-aligned anonymous
    mapping (shorter than the file was at open only if it shrank meanwhile). The CRC32,
    computed when `compute_crc` is true, equals `zlib.crc32` of the file's bytes as read
    and is computed over exactly these bytes: what the caller verifies is what it uses.

    `read_into` (with `compute_crc` and `expected_crc`, for a file of IN_PLACE_MIN_BYTES
    and its `min_file_bytes` or more) reads parts of the file into the caller's own
    memory instead, already faulted in (a model's variables): the file's CRC32 is first
    computed from the file itself, mapped (`crc32_file`: no copy, no new memory), and
    only if it equals `expected_crc` is `read_into` called, with the path
    and the open file, for the regions to read where (`Regions`). Their bytes are then
    read into those buffers, in file order with the rest, and covered by the CRC32 from
    there; their place in `contents` is left unread (zeros, taking no memory). The rest
    of `contents` is mapped in by another thread (`_populate`) ahead of the second read,
    and while the first runs if `read_into.rest_in_new_memory`. So a file that is bad
    when opened never reaches those buffers; one that changes between the two reads
    does, and the CRC32 returned, of the second, then shows it.
    """
    with open(path, "rb", buffering=0) as stream:
        size = os.fstat(stream.fileno()).st_size
        # New memory at every restart: huge pages would risk a compaction stall
        contents = memoryview(_memory_for(path, size, anonymous_memory))
        regions: list[tuple[int, memoryview]] = []
        if read_into and compute_crc and size >= max(IN_PLACE_MIN_BYTES, read_into.min_file_bytes):
            # While the first pass waits for the disk, the memory the rest goes to is
            # mapped in; from the page cache the first pass is short, and so is this.
            first_pass = _Populating([contents] if read_into.rest_in_new_memory else [])
            try:
                verified = _mapped_crc32(stream.fileno()) == expected_crc
            finally:
                first_pass.stop()
            if verified:
                regions = _checked_regions(path, read_into.plan(path, stream), size)
                if read_into.rest_in_new_memory:
                    for offset, view in regions:  # read elsewhere: give back what was mapped
                        _release(contents, offset, len(view))
                stream.seek(0)
        pieces = _destinations(contents, regions, size)
        # The new memory (between the regions, if any) is mapped in by another thread,
        # ahead of the reader, which then copies from the page cache into memory mapped
        # in already: a file just read once, or still in the page cache since its save,
        # is read faster so (benchmarks/bench_shapes.py); one read from the disk is not
        # read slower.
        second_pass = _Populating([view for _, view in pieces if view.obj is contents.obj])
        running = [0]

        def add_to_crc(data: memoryview) -> None:  # in the CRC thread, chunk by chunk
            running[0] = crc32(data, running[0])

        pending: list[concurrent.futures.Future[None]] = []
        filled = 0
        try:
            for start, target in pieces:
                done = 0
                while done < len(target):
                    step = CHUNK_BYTES if size - start - done > CHUNK_BYTES else LAST_PIECE_BYTES
                    count = stream.readinto(target[done : done + step])
                    if not count:
                        break
                    if compute_crc:
                        pending.append(crc_thread.submit(add_to_crc, target[done : done + count]))
                    done += count
                filled = start + done
                if done < len(target):  # the file ends early: it shrank
                    break
        finally:
            second_pass.stop()
        for chunk in pending:
            chunk.result()
    return contents[:filled].toreadonly(), running[0] if compute_crc else None


def _memory_for(path: str, size: int, allocate: Callable[..., Any]) -> Any:
    """`allocate(size, huge_pages=False)`, or, where the system refuses that memory, a
    CheckpointError saying so in one line: the file, its size, the memory there is
    (MemAvailable, RLIMIT_AS) and what to do."""
    try:
        return allocate(size, huge_pages=False)
    except (OSError, OverflowError, MemoryError) as error:
        if isinstance(error, OSError) and error.errno != errno.ENOMEM:
            raise
    from ..errors import CheckpointError

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    available = available_memory_bytes()
    raise CheckpointError(
        f"'{path}' is {size / 2**30:.1f} GiB, more memory than this process can allocate "
        f"to read it (MemAvailable "
        f"{'unknown' if available is None else f'{available / 2**30:.1f} GiB'}, RLIMIT_AS "
        f"{'unlimited' if limit == resource.RLIM_INFINITY else f'{limit / 2**30:.1f} GiB'}); "
        f"nothing was loaded. Restart on a node with more memory, or check the file: "
        f"'candle-ckpt list' shows the size each epoch recorded"
    )


_MADV_POPULATE_WRITE = 23  # Linux 5.14; the mmap module does not name it
_POPULATE_STEP = 4 << 20


class _Populating:
    """`_populate(views)` in the copy thread, from now until `stop`."""

    def __init__(self, views: list[memoryview]) -> None:
        self._stop = threading.Event()
        self._done = copy_thread.submit(_populate, views, self._stop) if views else None

    def stop(self) -> None:
        self._stop.set()
        if self._done is not None:
            self._done.result()


def _populate(views: list[memoryview], stop: threading.Event) -> None:
    """Map the anonymous memory under `views` in, in order, until `stop` is set (through
    ctypes, which releases the GIL; a kernel without MADV_POPULATE_WRITE leaves it to
    the faults of the read)."""
    import ctypes

    for view in views:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        begin = address // mmap.PAGESIZE * mmap.PAGESIZE
        for at in range(begin, address + len(view), _POPULATE_STEP):
            length = min(_POPULATE_STEP, address + len(view) - at)
            if stop.is_set() or _madvise(at, length, _MADV_POPULATE_WRITE):
                return


def _release(contents: memoryview, offset: int, length: int) -> None:
    """Give back the whole pages of `contents[offset:offset + length]` (MADV_DONTNEED:
    they read as zeros again, and take no memory)."""
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(contents))
    begin = -(-(address + offset) // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > begin:
        _madvise(begin, end - begin, mmap.MADV_DONTNEED)


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _madvise(address: int, length: int, advice: int) -> int:
    """madvise(2); 0, or -1 where the kernel refuses the advice."""
    import ctypes

    return int(_libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice))


def _checked_regions(path: str, regions: Regions, size: int) -> list[tuple[int, memoryview]]:
    """`regions` as (offset, writable byte view), in file order, checked to lie inside
    the file without overlapping."""
    checked, end = [], 0
    for offset, buffer in sorted(regions, key=lambda region: region[0]):
        view = memoryview(buffer).cast("B")
        if offset < end or offset + len(view) > size or view.readonly:
            raise ValueError(
                f"'{path}': a region of {len(view)} bytes at offset {offset} overlaps the one "
                f"before (ending at {end}), ends past the file ({size} bytes) or is read-only"
            )
        checked.append((offset, view))
        end = offset + len(view)
    return checked


def _destinations(
    contents: memoryview, regions: list[tuple[int, memoryview]], size: int
) -> list[tuple[int, memoryview]]:
    """(file offset, buffer) for every byte of the file in order: the regions' own
    buffers, and `contents` for the bytes between them."""
    pieces, position = [], 0
    for offset, view in regions:
        if position < offset:
            pieces.append((position, contents[position:offset]))
        if len(view):
            pieces.append((offset, view))
        position = offset + len(view)
    if position < size:
        pieces.append((position, contents[position:size]))
    return pieces


class WrittenFileCrc:
    """The CRC32 of a file as `direct_io.write_at` writes regions into it: each region's
    bytes from the memory they are written from, the bytes between and after the regions
    (the file layout's own, never written by `write_at`) read back from the file.

    `add` queues a region to the CRC thread, which runs the queue in order while the
    writer goes on: the running value follows the file from its start, so no two CRCs
    need combining. The caller must neither change a region's memory nor write the
    bytes between regions until `result`.

    Args:
        fd: the file, open for reading, until `result` or `wait` returned.
        path: the file's name, for messages.
    """

    def __init__(self, fd: int, path: str) -> None:
        self._fd, self._path = fd, path
        self._end = 0  # where the last region added ends
        self._running = 0
        self._pending: list[concurrent.futures.Future[None]] = []

    def add(self, offset: int, data: Any) -> None:
        """Queue the region of C-contiguous bytes `data` at `offset`, which must not start
        before the end of the region added before it."""
        if offset < self._end:
            raise ValueError(
                f"'{self._path}': a region at offset {offset} overlaps the one before, which "
                f"ends at {self._end}; expected regions that do not overlap"
            )
        self._pending.append(crc_thread.submit(self._add, self._end, offset, data))
        self._end = offset + memoryview(data).nbytes

    def result(self) -> int:
        """The CRC32 of the whole file (the bytes after the last region read back)."""
        self._pending.append(
            crc_thread.submit(self._add, self._end, os.fstat(self._fd).st_size, b"")
        )
        self.wait()
        for task in self._pending:
            task.result()
        return self._running

    def wait(self) -> None:
        """Wait for every queued task (a write failed: the fd is closed next)."""
        concurrent.futures.wait(self._pending)

    def _add(self, start: int, stop: int, data: Any) -> None:
        """Add the file's bytes [start, stop), then `data` (in the CRC thread)."""
        running, position = self._running, start
        while position < stop:
            chunk = os.pread(self._fd, min(CHUNK_BYTES, stop - position), position)
            if not chunk:
                raise OSError(
                    errno.EIO, f"file ends at {position}, expected {stop} bytes", self._path
                )
            running = crc32(chunk, running)
            position += len(chunk)
        view = memoryview(data).cast("B")
        self._running = _crc32_range(view, 0, len(view), crc32, None, running)


def _crc32_range(
    view: memoryview,
    start: int,
    stop: int,
    crc_function: CrcFunction,
    progress: Progress | None = None,
    value: int = 0,
) -> int:
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
