"""Tiny durable file-system primitives, each with one job and one guarantee.

Every step of the save protocol is one of these. Each states what holds after a crash
(kill -9 or power loss) at any instant. All paths of one call must be on the same file
system, as `rename(2)` requires. POSIX only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable

from .faults import fault_point

_TEMPORARY_NAME = re.compile(r"\..+\.tmp\.[0-9a-f]{12}\Z")


def fsync_file(path: str) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sync_file_range() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class WritebackStarter:
    """Starts the kernel writing a file to disk while the file is still being written.

    Call it with the number of bytes written so far; every `every_bytes` it asks the
    kernel to begin writeback of the file's dirty pages without waiting (Linux
    `sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the disk works while the writer
    produces the rest and the final `fsync_file` has little left to wait for. It gives
    no durability by itself: the fsync is still required. Elsewhere than Linux it does
    nothing.

    Args:
        path: the file being written (opened separately, read-only).
        every_bytes: how much new data between two requests.
    """

    def __init__(self, path: str, every_bytes: int = 16 << 20) -> None:
        self.path, self.every_bytes, self._next = path, every_bytes, every_bytes

    def __call__(self, bytes_written: int) -> None:
        if _sync_file_range is None or bytes_written < self._next:
            return
        self._next = bytes_written + self.every_bytes
        fd = os.open(self.path, os.O_RDONLY)
        try:
            _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
        finally:
            os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (creations, renames, removals) to stable storage."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: str, data: bytes, *, sync: bool) -> None:
    """Append one line (`data`, ending in a newline) to the file `path` in one `write(2)`.

    The file is opened with O_APPEND for this line only, so a process that dies by an
    exception leaves no descriptor open. A kill leaves at most this line torn (no
    newline at its end); a line torn earlier is ended with a newline first, so that it
    and this one are not read as one. With `sync` the line is fsynced.

    Raises:
        OSError: the file cannot be opened or written (a short write, on a full disk,
            is ended with a newline and raised).
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
    descriptor = os.open(path, flags, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            os.write(descriptor, b"\n")
        written = os.write(descriptor, data)
        if written != len(data):
            os.write(descriptor, b"\n")
            raise OSError(
                errno.ENOSPC, f"wrote {written} of {len(data)} bytes of a line (disk full?)", path
            )
        if sync:
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_name(path: str) -> str:
    """A sibling of `path` that no other writer uses: `.<name>.tmp.<unique>`.

    Temporary names start with a dot and never parse as an epoch number, so no reader
    can mistake one for a checkpoint.
    """
    head, tail = os.path.split(os.fspath(path))
    return os.path.join(head, f".{tail}.tmp.{uuid.uuid4().hex[:12]}")


def is_temporary_name(name: str) -> bool:
    """Whether a directory entry's name is one `temporary_name` makes."""
    return _TEMPORARY_NAME.match(name) is not None


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Replace the file `path` by `data`: readers see the old file or the whole new one.

    Writes a temporary sibling, fsyncs it, renames it over `path` and fsyncs the
    directory. After a crash `path` is either the old or the new file; at worst a
    temporary sibling is left behind.
    """
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        if isinstance(error, OSError) and error.filename is None:
            # A buffered write's error (ENOSPC at the flush) names no file.
            raise OSError(error.errno, error.strerror, path) from error
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def rename_durable(source: str, destination: str) -> None:
    """Rename `source` to `destination` and make the rename durable.

    After a crash, exactly one of the two names exists. Both parent directories are
    fsynced (once if they are the same).
    """
    os.rename(source, destination)
    destination_parent = os.path.dirname(os.path.abspath(destination))
    source_parent = os.path.dirname(os.path.abspath(source))
    fsync_dir(destination_parent)
    if source_parent != destination_parent:
        fsync_dir(source_parent)


def replace_symlink(target: str, link_path: str) -> None:
    """Point the symlink `link_path` at `target` atomically, replacing any old link.

    Creates the link under a temporary name and `os.replace`s it over `link_path`, then
    fsyncs the directory: at every instant `link_path` is the old link or the new one,
    never absent. `target` is stored as given (pass a relative path for a movable tree).
    """
    temporary = temporary_name(link_path)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link_path)
    except BaseException:
        os.unlink(temporary)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(link_path)))


def remove_link(link_path: str) -> None:
    """Remove the symlink `link_path` if it exists, durably."""
    try:
        os.unlink(link_path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(os.path.abspath(link_path)))


def move_to_trash(path: str, trash_dir: str) -> str | None:
    """Rename the directory `path` into `trash_dir` durably; return where it went.

    After this, no reader sees `path`, and nothing was deleted yet: the slow removal
    can run later or elsewhere (`empty_trash`). `trash_dir` must be on the same file
    system and is ignored by readers. Returns None when `path` did not exist.
    """
    os.makedirs(trash_dir, exist_ok=True)
    moved = os.path.join(trash_dir, f"{os.path.basename(path)}.{uuid.uuid4().hex[:12]}")
    try:
        rename_durable(path, moved)
    except FileNotFoundError:
        return None
    fault_point("after_trash_rename")
    return moved


def discard_tree(path: str, trash_dir: str) -> str | None:
    """Delete the directory `path` now, so that no reader ever sees it half-deleted.

    `move_to_trash`, then remove it there. A crash leaves either the whole tree at
    `path` or a leftover in `trash_dir`, which `empty_trash` finishes.
    Returns the trash path it was moved to, or None when `path` did not exist.
    """
    moved = move_to_trash(path, trash_dir)
    if moved is not None:
        shutil.rmtree(moved)
    return moved


def empty_trash(trash_dir: str) -> list[str]:
    """Finish deletions a crash interrupted: remove everything inside `trash_dir`.

    Returns the names removed.
    """
    try:
        names = sorted(os.listdir(trash_dir))
    except FileNotFoundError:
        return []
    for name in names:
        entry = os.path.join(trash_dir, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry)
        else:
            os.unlink(entry)
    return names
