"""Moving large buffers between memory and files without holding the GIL, for any framework.

A background save competes with training on the same cores. h5py holds the GIL for as
long as HDF5 writes a dataset, so the training thread, which needs the GIL between its
kernels, waits for each of those writes. The file formats therefore only lay the file
out (a few kilobytes of metadata, laid out in memory by their own library and written
by `candle_ckpt.hdf5.write_file`) and leave the bulk of the bytes to `write_at`, whose
`os.pwrite` calls each release the GIL. The Keras h5 format uses it
(`candle_ckpt.keras.h5.write`), and so does the PyTorch one.

`write_at` writes what it can with `O_DIRECT`: the kernel then moves the bytes from the
caller's memory to the disk without copying them into the page cache, a copy that
costs about as much CPU time as the whole write takes wall time, CPU a background save
takes from training (benchmarks/bench_direct_write.py). Since nothing of those bytes is
in the page cache, reading the file back for its CRC32 would read the disk:
`write_at` computes the CRC32 from the memory it writes instead
(`checksum.WrittenFileCrc`).

Snapshots and restart reads live in `memory.anonymous_memory`, so that an array carved
out of it on an ALIGNMENT boundary is written by O_DIRECT straight from where it is.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .checksum import WrittenFileCrc
from .faults import fault_point
from .memory import anonymous_memory, copy_thread

# One pwrite per piece: short enough that the progress callback (writeback start) runs
# often and the CRC thread follows the writes closely, long enough that the per-call
# cost vanishes.
PIECE_BYTES = 8 << 20

# O_DIRECT needs the file offset, the length and the memory address of every write to be
# multiples of the device's logical block size; the page size is a multiple of every
# common one (512, 4096).
ALIGNMENT = 4096

# A source not on an ALIGNMENT boundary (a live tensor) is copied into an aligned bounce
# buffer of this size, one piece at a time, and written from there: a piece that stays
# in the CPU's cache between the copy and the write (benchmarks/bench_direct_write.py
# compares sizes, and the copy against a buffered write).
BOUNCE_BYTES = 2 << 20


# From this size on, `copy_into` copies the second half of an array in the copy thread
# while the caller copies the first (numpy releases the GIL while it copies): a snapshot,
# which stalls training, takes the core training leaves idle meanwhile
# (benchmarks/bench_direct_write.py, "copy into a snapshot").
PARALLEL_COPY_BYTES = 16 << 20


def copy_into(target: Any, source: Any) -> None:
    """`np.copyto(target, source)` of two arrays of the same shape and dtype, in two
    threads from PARALLEL_COPY_BYTES on when both are C-contiguous."""
    import numpy as np

    contiguous = target.flags.c_contiguous and source.flags.c_contiguous
    if target.nbytes < PARALLEL_COPY_BYTES or not contiguous:
        np.copyto(target, source)
        return
    into, out_of = target.reshape(-1), source.reshape(-1)
    half = into.size // 2
    second = copy_thread.submit(np.copyto, into[half:], out_of[half:])
    try:
        np.copyto(into[:half], out_of[:half])
    finally:
        second.result()


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of ALIGNMENT: where the next array of a block
    laid out for O_DIRECT starts."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def aligned_arrays(layout: Sequence[tuple[Any, tuple[int, ...]]]) -> list[Any]:
    """Writable numpy arrays of the (dtype, shape) pairs of `layout`, carved out of one
    new block of `anonymous_memory` (huge pages), each starting on an ALIGNMENT
    boundary: `write_at` writes them with O_DIRECT from where they are. Contents
    undefined until written."""
    import numpy as np

    dtypes = [np.dtype(dtype) for dtype, _ in layout]
    counts = [math.prod(shape) for _, shape in layout]
    memory = anonymous_memory(sum(aligned(n * d.itemsize) for n, d in zip(counts, dtypes)))
    arrays, offset = [], 0
    for dtype, count, (_, shape) in zip(dtypes, counts, layout):
        arrays.append(np.frombuffer(memory, dtype, count, offset).reshape(shape))
        offset += aligned(count * dtype.itemsize)
    return arrays


@dataclass(frozen=True)
class Written:
    """What `write_at` did: the region bytes written, of them how many with O_DIRECT, and
    the CRC32 of the whole file as it then is (the value `zlib.crc32` of its bytes has),
    None when it was asked for none."""

    nbytes: int
    direct_bytes: int
    crc32: int | None


def write_at(
    path: str,
    regions: Iterable[tuple[int, Any]],
    progress: Callable[[int], None] | None = None,
    *,
    checksum: bool = True,
) -> Written:
    """Write each (offset, bytes) of `regions` into the existing file `path`, in place,
    and return what was written with the file's CRC32.

    The file is neither created nor truncated: its layout (where each region goes, inside
    the file) was made by whoever created it, and nothing but these writes changes it
    until it is fsynced. Short writes are continued; the GIL is released during every
    write, copy and CRC. Nothing is fsynced: the save protocol fsyncs every file of the
    epoch before it renames the epoch into place, so a process killed during or after
    these writes leaves no epoch that holds them half-written.

    A region that starts on an ALIGNMENT boundary of the file is written with O_DIRECT up
    to its last whole ALIGNMENT block: from its own memory where that is aligned too (a
    snapshot carved out of `anonymous_memory`), else through an aligned bounce buffer.
    The rest (a region's tail, a region at an unaligned offset, every region on a file
    system that refuses O_DIRECT, such as tmpfs before Linux 6.6) goes through the page
    cache.

    The CRC32 is computed in the CRC thread while the writes go on, from the memory each
    region is written from and from the bytes between the regions read back from the
    file (the layout's own, few, in the page cache): `checksum.WrittenFileCrc`.

    Args:
        path: the file.
        regions: (file offset, C-contiguous buffer) pairs, in any order, not overlapping,
            each inside the file.
        progress: called with the bytes written through the page cache so far after
            every piece (e.g. a `durable.WritebackStarter`: bytes written with O_DIRECT
            are on the disk already).
        checksum: whether to compute the CRC32 (`ckpt_checksum` false: no CRC work
            competes with training for the cores).

    Returns:
        `Written`: the bytes written, how many of them with O_DIRECT, the file's CRC32
        (None without `checksum`).

    Raises:
        OSError: a write failed (ENOSPC, EIO), naming `path`.
        ValueError: two regions overlap, or one ends past the end of the file.
    """
    import numpy as np  # here, not at module import: the command line imports this module

    arrays = ((offset, np.frombuffer(buffer, np.uint8)) for offset, buffer in regions)
    ordered = sorted(((o, a) for o, a in arrays if a.nbytes), key=lambda region: region[0])
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        for offset, data in ordered:
            if offset + data.nbytes > size:
                raise ValueError(
                    f"'{path}': a region of {data.nbytes} bytes at offset {offset} ends past "
                    f"the end of the file ({size} bytes); expected the layout to hold it"
                )
        writer = _RegionWriter(path, fd, progress)
        crc = WrittenFileCrc(fd, path) if checksum else None
        try:
            for number, (offset, data) in enumerate(ordered):
                if crc is not None:
                    crc.add(offset, data)
                writer.write(offset, data)
                if number == 0:
                    fault_point("during_direct_write")
            file_crc = crc.result() if crc is not None else None
        finally:
            if crc is not None:
                crc.wait()  # no CRC task may read the fd after it is closed
            writer.close()
    finally:
        os.close(fd)
    return Written(writer.written, writer.direct_written, file_crc)


def _open_direct(path: str) -> int | None:
    """`path` opened for O_DIRECT writes, or None where the file system refuses it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_NOFOLLOW)
    except OSError as error:
        if error.errno == errno.EINVAL:  # file systems without O_DIRECT (tmpfs before 6.6)
            return None
        raise OSError(error.errno, error.strerror, path) from error


class _RegionWriter:
    """Writes regions of one file: the aligned part of each with O_DIRECT while the file
    system takes it, the rest through the page cache."""

    def __init__(self, path: str, fd: int, progress: Callable[[int], None] | None) -> None:
        self.path, self.fd, self.progress = path, fd, progress
        self.direct = _open_direct(path)
        self.bounce: Any = None  # numpy array on page-aligned memory, made when needed
        self.written, self.direct_written, self.buffered_written = 0, 0, 0

    def write(self, offset: int, data: Any) -> None:
        done = 0
        if self.direct is not None and offset % ALIGNMENT == 0:
            done = self._write_direct(offset, data[: data.nbytes - data.nbytes % ALIGNMENT])
        position = done
        while position < data.nbytes:
            piece = data[position : position + PIECE_BYTES]
            self.buffered_written += self._pwrite(self.fd, piece, offset + position)
            position += piece.nbytes
            if self.progress is not None:
                self.progress(self.buffered_written)
        self.written += data.nbytes

    def _write_direct(self, offset: int, data: Any) -> int:
        """Write whole ALIGNMENT blocks of `data` with O_DIRECT; return how many bytes were
        written, fewer than all when the file system refused (the caller writes the rest
        through the page cache)."""
        import numpy as np

        aligned = data.ctypes.data % ALIGNMENT == 0
        step = PIECE_BYTES if aligned else BOUNCE_BYTES
        position = 0
        while position < data.nbytes:
            piece = data[position : position + step]
            if not aligned:
                if self.bounce is None:
                    self.bounce = np.frombuffer(anonymous_memory(BOUNCE_BYTES, False), np.uint8)
                np.copyto(self.bounce[: piece.nbytes], piece)
                piece = self.bounce[: piece.nbytes]
            try:
                count = self._pwrite(self.direct, piece, offset + position, once=True)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                count = 0  # O_DIRECT opened but refused at writing (alignment): no more
            self.direct_written += count
            position += count
            if count < piece.nbytes:  # what is left is no longer aligned, or refused
                self._close_direct()
                break
        return position

    def _pwrite(self, fd: int | None, data: Any, offset: int, once: bool = False) -> int:
        """Write `data` at `offset`, continuing short writes unless `once`."""
        assert fd is not None
        done = 0
        while done < data.nbytes:
            try:
                count = os.pwrite(fd, data[done:], offset + done)
            except OSError as error:
                raise OSError(error.errno, error.strerror, self.path) from error
            done += count
            if once:
                break
        return done

    def _close_direct(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None

    def close(self) -> None:
        self._close_direct()
