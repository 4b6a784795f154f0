"""HDF5 writing and reading shared by the Keras and PyTorch model files: no framework,
h5py only.

A model file is laid out by h5py in memory (`FileImage`, `create_file`, `create_array`)
and written by the library's own writer (`write_file`), so that no file-system error
ever happens inside HDF5. A verified model file is parsed from the bytes that were
checksummed (`InMemoryFile`), its contiguous datasets read as views of those bytes
(`dataset_array`), and only hard links inside the file are followed (`group`,
`dataset`): data stored in other files never reaches a model.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import io
import os
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

from .core.errors import CheckpointFormatError
from .core.storage.direct_io import ALIGNMENT, Written, write_at
from .core.storage.memory import PrivateMemory

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
"""The first bytes of an HDF5 file (with no user block)."""

# How many buffers one `os.pwritev` takes (Linux's IOV_MAX).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# Arrays from this size on are laid out by h5py on an ALIGNMENT boundary and written by
# `direct_io.write_at` (`create_file`, `create_array`, `write_file`), with O_DIRECT
# where it can.
DIRECT_MIN_BYTES = 64 << 10


def raised_in(error: BaseException, *packages: str) -> bool:
    """Whether code of one of `packages` itself raised `error` (the innermost frame of
    its traceback is in it, Cython modules included), rather than code it called or
    code around it."""
    trace = error.__traceback__
    if trace is None:
        return False
    while trace.tb_next is not None:
        trace = trace.tb_next
    module = str(trace.tb_frame.f_globals.get("__name__", ""))
    return any(module == package or module.startswith(package + ".") for package in packages)


class FileImage(io.RawIOBase):
    """A new HDF5 file laid out in memory, for h5py's file-object driver: it keeps
    what HDF5 writes (the layout, a few kilobytes, and the small arrays), never the
    space of the datasets HDF5 allocates and leaves unwritten (`create_array`), which
    reads as zeros.

    HDF5 thus never writes to a file system. A write that fails there (a full disk, an
    exceeded quota, EIO) fails in `write_file`, as an OSError, rather than inside HDF5,
    whose state does not survive an error while it writes its own metadata: h5py then
    reports it from object destructors that cannot raise, and the process can end in a
    segmentation fault.
    """

    def __init__(self) -> None:
        super().__init__()
        self._writes: list[tuple[int, bytes]] = []  # (offset, bytes) in the order written
        self._position = 0
        self.size = 0
        """The file's size: where HDF5 ended it (its last `truncate`)."""

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # HDF5 seeks before every write (thousands for a model of many small layers)
        if whence == io.SEEK_SET:
            self._position = offset
        else:
            self._position = offset + (self._position if whence == io.SEEK_CUR else self.size)
        return self._position

    def tell(self) -> int:
        return self._position

    def write(self, data: Any) -> int:
        chunk = bytes(data)  # h5py's buffer is valid during the call only
        self._writes.append((self._position, chunk))
        self._position += len(chunk)
        if self._position > self.size:
            self.size = self._position
        return len(chunk)

    def truncate(self, size: int | None = None) -> int:
        self.size = self._position if size is None else size
        return self.size

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        count = max(0, min(len(target), self.size - self._position))
        _apply(self._writes, self._position, target[:count])
        self._position += count
        return count

    def regions(self) -> list[tuple[int, memoryview]]:
        """What HDF5 wrote, as (offset, bytes) of the file in offset order, none
        overlapping: each write as it was, but writes that overlap (HDF5 rewrites its
        superblock) merged into one run, the later winning. Only merged runs are copies,
        so the small arrays are not held twice."""
        spans = ((offset, min(offset + len(chunk), self.size)) for offset, chunk in self._writes)
        extents: list[list[int]] = []
        for start, stop in sorted(span for span in spans if span[0] < span[1]):
            if extents and start < extents[-1][1]:
                extents[-1][1] = max(extents[-1][1], stop)
            else:
                extents.append([start, stop])
        starts = [start for start, _ in extents]
        members: list[list[tuple[int, bytes]]] = [[] for _ in extents]
        for offset, chunk in self._writes:  # each inside one extent, by construction
            stop = min(offset + len(chunk), self.size)
            if offset < stop:
                members[bisect.bisect_right(starts, offset) - 1].append(
                    (offset, chunk[: stop - offset])
                )
        runs = []
        for (start, stop), written in zip(extents, members):
            if len(written) == 1:
                runs.append((start, memoryview(written[0][1])))
                continue
            run = bytearray(stop - start)
            for offset, chunk in written:
                run[offset - start : offset - start + len(chunk)] = chunk
            runs.append((start, memoryview(run)))
        return runs


def _apply(writes: list[tuple[int, bytes]], start: int, target: memoryview) -> None:
    """Fill `target`, the file's bytes from `start`, from `writes` (zeros where none)."""
    target[:] = bytes(len(target))
    stop = start + len(target)
    for offset, chunk in writes:
        low, high = max(offset, start), min(offset + len(chunk), stop)
        if low < high:
            target[low - start : high - start] = chunk[low - offset : high - offset]


def create_file(image: FileImage) -> h5py.File:
    """A new HDF5 file laid out in `image`, whose datasets of DIRECT_MIN_BYTES or more
    start on an ALIGNMENT boundary: `direct_io.write_at` can write them with O_DIRECT,
    and they are page-aligned in memory once the file is read into page-aligned memory,
    so they can be used in place. `write_file` writes it once it is closed."""
    return h5py.File(image, "w", alignment_threshold=DIRECT_MIN_BYTES, alignment_interval=ALIGNMENT)


def write_file(
    path: str,
    image: FileImage,
    direct: list[tuple[int, Any]],
    progress: Callable[[int], None] | None = None,
    *,
    checksum: bool = True,
) -> Written:
    """Write the closed HDF5 file of `image`, with the arrays of `direct` (`create_array`)
    in the space it left for them, to `path` (created or truncated); return what
    `direct_io.write_at` wrote of the arrays, with the file's CRC32 (None without
    `checksum`).

    The file is created at its full size and what HDF5 wrote (a few kilobytes, and the
    small arrays) is written through the page cache, as HDF5 would have; then
    `write_at` writes the arrays (`progress` as there). Does not fsync.

    Raises:
        OSError: a write failed, naming `path`; out of space (ENOSPC) or over quota
            (EDQUOT), with the size the file needs.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        try:
            os.ftruncate(fd, image.size)
            _write_runs(fd, image.regions())
        finally:
            os.close(fd)
        return write_at(path, direct, progress, checksum=checksum)
    except OSError as error:
        strerror = error.strerror
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            strerror = f"{strerror} (a file of {image.size} bytes)"
        raise OSError(error.errno, strerror, path) from error


def _write_runs(fd: int, runs: list[tuple[int, memoryview]]) -> None:
    """Write `runs` ((offset, bytes), in offset order) into `fd`: each series of runs
    that follow one another in the file with one `os.pwritev` of up to _IOV_MAX of them
    (HDF5 writes a model of many small layers in thousands of pieces)."""
    k = 0
    while k < len(runs):
        start, end = runs[k][0], runs[k][0]
        batch: list[memoryview] = []
        while k < len(runs) and runs[k][0] == end and len(batch) < _IOV_MAX:
            batch.append(runs[k][1])
            end += len(runs[k][1])
            k += 1
        done = os.pwritev(fd, batch, start)
        if done < end - start:  # a short write (the disk filling): the rest one by one
            rest = memoryview(b"".join(batch))[done:]
            while rest:
                count = os.pwrite(fd, rest, start + done)
                done, rest = done + count, rest[count:]


def create_array(
    group: h5py.Group, name: str, array: np.ndarray, direct: list[tuple[int, np.ndarray]]
) -> h5py.Dataset:
    """Create dataset `name` in `group` for `array` and return it: a small array written
    by h5py (into the `FileImage`), a large one allocated unfilled, its (file offset,
    array) appended to `direct` for `write_file` to write once the file is closed.

    h5py holds the GIL while HDF5 writes a dataset; `write_at` does not, so a training
    thread running alongside a background save keeps going. The dataset is contiguous
    and uncompressed either way, which is what `dataset_array` reads in place.
    """
    if array.nbytes < DIRECT_MIN_BYTES or not array.flags.c_contiguous:
        # h5py hands a C-contiguous array to HDF5 uncopied.
        return group.create_dataset(name, data=array)
    created = create_unfilled(group, name, array.shape, array.dtype)
    direct.append((created.id.get_offset(), array))
    return created


def create_unfilled(
    group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any
) -> h5py.Dataset:
    """Create dataset `name` in `group`, contiguous and uncompressed, its space allocated
    in the file (its offset known: `dataset.id.get_offset()`, None when empty) but
    never written by HDF5: `write_file` writes its bytes there (`create_array`)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return group.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)


def contiguous_offset(dataset: h5py.Dataset) -> int | None:
    """Where in the file the dataset's values are, if they are stored there as one
    contiguous run of bytes (as h5py and Keras write them), else None."""
    offset = dataset.id.get_offset()  # None unless contiguous and allocated
    nbytes = dataset.size * dataset.dtype.itemsize
    if offset is None or nbytes == 0 or dataset.id.get_storage_size() != nbytes:
        return None
    return int(offset)


def in_place_offset(dataset: h5py.Dataset) -> int | None:
    """Where a restart reads `dataset` straight into the model's own buffer: its file
    offset if it is contiguous and of DIRECT_MIN_BYTES or more, else None (a smaller
    one costs more to plan than the copy it spares)."""
    if dataset.size * dataset.dtype.itemsize < DIRECT_MIN_BYTES:
        return None
    return contiguous_offset(dataset)


def writable_bytes(address: int, nbytes: int) -> np.ndarray:
    """A writable uint8 array over `nbytes` of memory at `address` that a framework
    owns (a variable's or tensor's buffer), for `checksum.read_file` to read into. It
    holds no reference: whoever calls keeps the owner alive while it is used."""
    return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(address))


def dataset_array(dataset: h5py.Dataset, contents: Any, path: str) -> np.ndarray:
    """The dataset's values: a view of `contents` where the dataset is stored as one
    contiguous run of bytes (`contiguous_offset`), else read by HDF5."""
    offset = contiguous_offset(dataset)
    nbytes = dataset.size * dataset.dtype.itemsize
    if offset is None:
        return np.asarray(dataset[()])
    if offset + nbytes > len(contents):
        raise CheckpointFormatError(
            f"'{path}': dataset '{dataset.name}' ({nbytes} bytes at offset {offset}) "
            f"extends past the end of the file ({len(contents)} bytes)"
        )
    return np.frombuffer(contents, dataset.dtype, dataset.size, offset).reshape(dataset.shape)


def reads_as_view(dataset: h5py.Dataset, size: int) -> bool:
    """Whether `dataset_array` reads the dataset of a file of `size` bytes as a view of
    its contents, without HDF5 and so without a way to fail: it is empty, or stored
    as one contiguous run of bytes inside the file. A restart that reads part of a file
    into the model's own memory first checks this of every dataset it will read."""
    nbytes = dataset.size * dataset.dtype.itemsize
    offset = contiguous_offset(dataset)
    return nbytes == 0 or (offset is not None and offset + nbytes <= size)


def writable_contents(contents: memoryview) -> memoryview:
    """`contents` made writable when its memory is private (`memory.PrivateMemory`,
    what `checksum.read_file` reads a restart's model file into), else as it is.

    Arrays read from the writable view (`dataset_array`) can become the restored
    tensors and variables themselves, rather than be copied: memory of no file and
    no other reader, which training may then update in place.
    """
    base = contents.obj
    if not isinstance(base, PrivateMemory) or base.closed or not contents.nbytes:
        return contents
    whole = memoryview(base)
    if (
        len(whole) < contents.nbytes
        or np.frombuffer(whole, np.uint8, 1).ctypes.data
        != np.frombuffer(contents, np.uint8, 1).ctypes.data
    ):
        return contents
    return whole[: contents.nbytes]


class InMemoryFile(io.RawIOBase):
    """A read-only, seekable file over bytes in memory, for h5py's file-object driver.

    io.BytesIO would copy the bytes first; this reads from them in place.
    """

    def __init__(self, contents: Any) -> None:
        super().__init__()
        self._contents = memoryview(contents).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._contents)}[
            whence
        ]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        chunk = self._contents[self._position : self._position + len(buffer)]
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


def group(parent: h5py.Group, name: str, path: str) -> h5py.Group:
    """parent[name], a group reached through hard links only."""
    return _follow(parent, name, h5py.Group, path)


def dataset(parent: h5py.Group, name: str, path: str) -> h5py.Dataset:
    """parent[name], a dataset reached through hard links, its data in this file."""
    found = _follow(parent, name, h5py.Dataset, path)
    # Refuse data stored in other files: only this file's contents may reach the model.
    if found.external or found.is_virtual:
        raise CheckpointFormatError(
            f"'{path}': dataset '{found.name}' stores its data outside the file"
        )
    return found


def layer_weights_root(f: h5py.File, path: str) -> h5py.Group:
    """The group of a Keras legacy HDF5 file that holds `layer_names` and one group per
    layer: the file itself (`save_weights`), or its `model_weights` (`model.save`).

    Raises:
        CheckpointFormatError: neither holds `layer_names` (not a Keras model file).
    """
    root: h5py.Group = f
    if "layer_names" not in f.attrs and "model_weights" in f:
        root = group(f, "model_weights", path)
    if not has_names(root, "layer_names"):
        raise CheckpointFormatError(
            f"'{path}' is not a Keras HDF5 model file: no 'layer_names' attribute in '{root.name}'"
        )
    return root


def has_names(group: h5py.Group, key: str) -> bool:
    """Whether `group` holds the name list `key`, whole or split in chunks (Keras)."""
    return key in group.attrs or f"{key}0" in group.attrs


def read_names(group: h5py.Group, key: str) -> list[str]:
    """A name list written whole or split in chunks (key0, key1, ...), as Keras does."""
    if key in group.attrs:
        chunks = [group.attrs[key]]
    else:
        chunks = []
        while f"{key}{len(chunks)}" in group.attrs:
            chunks.append(group.attrs[f"{key}{len(chunks)}"])
    return [attr_str(n) for chunk in chunks for n in np.atleast_1d(chunk)]


def attr_str(value: Any) -> str:
    """An HDF5 string attribute (bytes or str) as str."""
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _follow(parent: h5py.Group, name: str, kind: type, path: str) -> Any:
    """parent[name] through hard links only, checked to be a `kind`."""
    node = parent
    for part in name.split("/"):
        if not (
            isinstance(node, h5py.Group)
            and part
            and isinstance(node.get(part, getlink=True), h5py.HardLink)
        ):
            raise CheckpointFormatError(
                f"'{path}': no '{name}' under '{parent.name}' (stopped at '{node.name}': "
                f"no entry '{part}', or a soft or external link)"
            )
        node = node[part]
    if not isinstance(node, kind):
        raise CheckpointFormatError(
            f"'{path}': '{node.name}' is a {type(node).__name__}, expected a {kind.__name__}"
        )
    return node
