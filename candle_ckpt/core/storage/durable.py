"""Tiny durable file-system primitives, each with one job and one guarantee.

Every step of the save protocol is one of these. Each states what holds after a crash
(kill -9 or power loss) at any instant. All paths of one call must be on the same file
system, as `rename(2)` requires. POSIX only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import sys
import uuid
from collections.abc import Callable

from . import tree_fs

_DIRECTORY_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
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


def append_line(root: str, path: str, data: bytes, *, sync: bool) -> None:
    """Append one line (`data`, ending in a newline) to the file `path` of the checkpoint
    tree `root` in one `write(2)`.

    The file is reached without following a link (`tree_fs.open_tree_file`; `ckpts/`
    is made if missing) and opened with O_APPEND for this line only, so a process that
    dies by an exception leaves no descriptor open. A kill leaves at most this line
    torn (no newline at its end); a line torn earlier is ended with a newline first, so
    that it and this one are not read as one. With `sync` the line is fsynced.

    Raises:
        UnsafePathError: the file or a directory on the way is a link or of the wrong kind.
        OSError: the file cannot be opened or written (a short write, on a full disk,
            is ended with a newline and raised).
    """
    descriptor = tree_fs.open_tree_file(root, path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
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


def write_bytes_atomic(
    path: str, data: bytes, *, directory: int | None = None, sync: bool = True
) -> None:
    """Replace the file `path` by `data`: readers see the old file or the whole new one.

    Writes a temporary sibling (created, never opened through a link), fsyncs it,
    renames it over `path` and fsyncs the directory. After a crash `path` is either the
    old or the new file; at worst a temporary sibling is left behind. `directory`: the
    descriptor of `path`'s directory, to write through it rather than look the directory
    up by path (core/storage/tree_fs.py); by default the directory is opened by path.
    `sync=False` skips both fsyncs, for a file whose loss or tearing by a crash is
    detected and harmless (a cache): readers still never see a half-written file.
    """
    if directory is None:
        parent = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            write_bytes_atomic(path, data, directory=parent, sync=sync)
        finally:
            os.close(parent)
        return
    temporary = os.path.basename(temporary_name(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    descriptor = tree_fs.open_file(directory, temporary, path, flags, 0o666)
    try:
        with open(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            if sync:
                os.fsync(stream.fileno())
        os.replace(temporary, os.path.basename(path), src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=directory)
        if isinstance(error, OSError) and error.filename is None:
            # A buffered write's error (ENOSPC at the flush) names no file.
            raise OSError(error.errno, error.strerror, path) from error
        raise
    if sync:
        os.fsync(directory)


def rename_durable(source: str, destination: str) -> None:
    """Rename `source` to `destination` and make the rename durable.

    After a crash, exactly one of the two names exists. Both parent directories are
    fsynced (once if they are the same). For paths outside a checkpoint tree (an
    export); inside one, `rename_at`.
    """
    os.rename(source, destination)
    destination_parent = os.path.dirname(os.path.abspath(destination))
    source_parent = os.path.dirname(os.path.abspath(source))
    fsync_dir(destination_parent)
    if source_parent != destination_parent:
        fsync_dir(source_parent)


def rename_at(source_dir: int, source: str, destination_dir: int, destination: str) -> None:
    """Rename the entry `source` of the directory open as `source_dir` to `destination`
    of `destination_dir`, durably: after a crash exactly one of the two names exists.

    The entry itself is renamed, never what a link points to, and neither directory is
    looked up by path, so a link swapped in for one of them is not followed. An
    existing `destination` is replaced when `rename(2)` allows it (a file by a file, an
    empty directory by a directory). Both directories are fsynced (once if the same).
    """
    os.rename(source, destination, src_dir_fd=source_dir, dst_dir_fd=destination_dir)
    os.fsync(destination_dir)
    if not os.path.samestat(os.fstat(source_dir), os.fstat(destination_dir)):
        os.fsync(source_dir)


def replace_symlink(target: str, directory: int, name: str) -> None:
    """Point the symlink `name` of the directory open as `directory` at `target`
    atomically, replacing any old link.

    Creates the link under a temporary name and renames it over `name`, then fsyncs the
    directory: at every instant `name` is the old link or the new one, never absent.
    `target` is stored as given (pass a relative path for a movable tree).
    """
    temporary = temporary_name(name)
    os.symlink(target, temporary, dir_fd=directory)
    try:
        os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        os.unlink(temporary, dir_fd=directory)
        raise
    os.fsync(directory)


def remove_entry(directory: int, name: str) -> bool:
    """Remove the non-directory entry `name` (a link itself, never its target) of the
    directory open as `directory`, durably; False if there was none."""
    try:
        os.unlink(name, dir_fd=directory)
    except FileNotFoundError:
        return False
    os.fsync(directory)
    return True


def remove_link(link_path: str) -> None:
    """Remove the symlink (or file) `link_path` if it exists, durably."""
    parent = os.open(os.path.dirname(os.path.abspath(link_path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_entry(parent, os.path.basename(link_path))
    finally:
        os.close(parent)


def remove_tree(directory: int, name: str) -> None:
    """Delete the entry `name` of the directory open as `directory` and, if it is a real
    directory, everything below it; a link is removed itself, never what it points to.

    Walks by directory descriptors, opening each directory with O_NOFOLLOW and removing
    each entry relative to its parent's descriptor, as `shutil.rmtree`'s
    symlink-attack-resistant walk does (Python 3.11 offers it with `dir_fd` only), so a
    link swapped in anywhere below `name` while it runs is removed, not followed. Not
    durable by itself: callers remove only what they have moved out of sight.
    """
    try:
        fd = os.open(name, _DIRECTORY_NOFOLLOW, dir_fd=directory)
    except OSError as error:
        if error.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(name, dir_fd=directory)
        return
    try:
        with os.scandir(fd) as entries:
            children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
        for child, is_directory in children:
            if is_directory:
                remove_tree(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=directory)
