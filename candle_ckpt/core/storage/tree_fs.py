"""Reaching the paths of a checkpoint tree without following a symlink.

A checkpoint tree often lives in a directory that others can write (a team's project
directory on a cluster), so any entry of it may be replaced, at any time, by a symlink
pointing anywhere the job's user can write. The library therefore reaches every path
it creates, writes, renames or deletes from the tree's root one name at a time, each
opened with `O_NOFOLLOW`, and then acts through the descriptor of the directory that
holds the entry (`dir_fd`: `openat(2)`, `renameat(2)`, `unlinkat(2)`, ...). A link
found on the way is refused (`UnsafePathError`), and a link swapped in after that is
not followed either: nothing is looked up by its path again.

The root itself (`ckpt_directory`) is the user's own choice and may be a link (to a
scratch file system, say); `last` and `best` are links by design, read by
`layout.resolve_link` and replaced as links, never written through. Linux and the BSDs
report a link opened with `O_NOFOLLOW` as ELOOP; this module is POSIX-only, as
`durable` is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from ..errors import UnsafePathError
from ..format.layout import (
    CACHE_FILE,
    HISTORY_FILE,
    INDEX_FILE,
    LOCK_FILE,
    LOG_FILE,
    CheckpointLayout,
    parse_epoch_dirname,
    parse_step_dirname,
)

REMEDY = (
    "Remove it or move it out of the tree ('rm' of a link removes the link, not what it "
    "points to), then run again; the library follows no link in the tree but last and best"
)
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Which errors mean "not the kind of entry asked for" when opening without following.
_WRONG_KIND = {errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO}


def describe(dir_fd: int | None, name: str) -> str:
    """What the entry `name` of the directory `dir_fd` is, as an error names it: "a
    symbolic link to 'X'", "a directory", "a regular file", ..., or "nothing" if absent."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return "nothing (it disappeared while being checked)"
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link to '{os.readlink(name, dir_fd=dir_fd)}'"
        except OSError:
            return "a symbolic link"
    return _kind(mode)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device file"


def unsafe(path: str, found: str, expected: str) -> UnsafePathError:
    """The refusal of `path`, found to be `found` where `expected` belongs."""
    return UnsafePathError(f"'{path}' is {found}; expected {expected}. {REMEDY}")


def _parts(root: str, path: str) -> list[str]:
    relative = os.path.relpath(path, root)
    parts = [] if relative == "." else relative.split(os.sep)
    if ".." in parts:  # a caller's bug, never a user's input: every path comes from a layout
        raise ValueError(f"'{path}' is not inside the checkpoint tree '{root}'")
    return parts


def open_directory(root: str, path: str, *, create: bool = False) -> int:
    """A descriptor of the directory `path` inside the tree `root`, reached without
    following a link below `root` (the caller closes it).

    Args:
        root: the tree's root (`layout.root`), followed if it is a link.
        path: `root` or a directory below it (`layout.ckpts`, `layout.trash`, ...).
        create: make each missing directory on the way (mode 0777 less the umask).

    Raises:
        UnsafePathError: an entry on the way is a link or not a directory.
        FileNotFoundError: one is missing (and `create` is False).
    """
    parts = _parts(root, path)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if not create:
            raise
        os.makedirs(root, exist_ok=True)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for done, name in enumerate(parts, 1):
            where = os.path.join(root, *parts[:done])
            try:
                child = open_subdirectory(fd, name, where)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, dir_fd=fd)
                child = open_subdirectory(fd, name, where)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def directory(root: str, path: str, *, create: bool = False) -> Iterator[int]:
    """`open_directory` as a context: the descriptor is closed on leaving."""
    fd = open_directory(root, path, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_subdirectory(dir_fd: int, name: str, path: str) -> int:
    """A descriptor of the directory `name` of the directory open as `dir_fd` (named
    `path` in errors), opened without following a link (the caller closes it).

    Raises:
        UnsafePathError: `name` is a link or not a directory.
    """
    try:
        return os.open(name, _DIRECTORY_FLAGS, dir_fd=dir_fd)
    except OSError as error:
        if error.errno not in _WRONG_KIND:
            raise _named(error, path) from None
        raise unsafe(path, describe(dir_fd, name), "a directory") from None


def _named(error: OSError, path: str) -> OSError:
    """`error` of a call on a name relative to a descriptor, naming the whole `path`
    instead (same errno, so the same OSError subclass)."""
    return OSError(error.errno, error.strerror, path)


def require_entry_is(dir_fd: int, name: str, path: str, expected: os.stat_result) -> None:
    """Check that the entry `name` of `dir_fd` (named `path`) is still the file or
    directory whose status is `expected`, not a link or another entry swapped in.

    Raises:
        UnsafePathError: it is not.
    """
    try:
        status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        status = None
    if status is None or not os.path.samestat(status, expected):
        found = describe(dir_fd, name)
        raise unsafe(
            path,
            f"{found}, not the one the library made there (it was replaced meanwhile)",
            "the directory the library made",
        )


def require_same(root: str, path: str, fd: int) -> None:
    """Check that `path`, reached from `root` without following a link, is still the
    directory open as `fd` (one a writer was told to fill by path).

    Raises:
        UnsafePathError: it is not (a directory on the way was replaced).
    """
    parent = open_directory(root, os.path.dirname(path))
    try:
        require_entry_is(parent, os.path.basename(path), path, os.fstat(fd))
    finally:
        os.close(parent)


def open_file(dir_fd: int | None, name: str, path: str, flags: int, mode: int = 0o644) -> int:
    """Open the entry `name` of the directory `dir_fd` (named `path` in errors) as a
    regular file, never through a link (the caller closes the descriptor).

    A named pipe is not waited on: it is refused like a link or a directory.

    Raises:
        UnsafePathError: `name` is a link, a directory or not a regular file.
    """
    try:
        fd = os.open(
            name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dir_fd
        )
    except OSError as error:
        if error.errno not in _WRONG_KIND:
            raise _named(error, path) from None
        raise unsafe(path, describe(dir_fd, name), "a regular file") from None
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise unsafe(path, _kind(kind), "a regular file")
    return fd


def open_tree_file(root: str, path: str, flags: int, mode: int = 0o644) -> int:
    """Open the regular file `path` of the tree `root` (see `open_file`), its directory
    reached by `open_directory` (created when `flags` has O_CREAT)."""
    with directory(root, os.path.dirname(path), create=bool(flags & os.O_CREAT)) as parent:
        return open_file(parent, os.path.basename(path), path, flags, mode)


def require_directory(dir_fd: int, name: str, path: str) -> os.stat_result | None:
    """The status of the entry `name` of `dir_fd` (named `path`), which must be a real
    directory; None when there is no such entry.

    Raises:
        UnsafePathError: it is a link or not a directory.
    """
    try:
        status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(status.st_mode):
        raise unsafe(path, describe(dir_fd, name), "a directory")
    return status


def check_tree(layout: CheckpointLayout) -> list[str]:
    """Every entry the library writes in `layout`'s tree that is not of the kind it
    writes there (a link, a file where a directory belongs, or the reverse), as one
    sentence each naming the path and what was found. Reads only; an absent entry is
    fine. `last` and `best` are left to `layout.resolve_link`.
    """
    directory_ = "a directory"
    expected = [(layout.root, LOG_FILE, "a regular file")]
    if layout.ckpts != layout.root:  # upstream CANDLE's layout: the root is the tree
        expected.append((os.path.dirname(layout.ckpts), os.path.basename(layout.ckpts), directory_))
    for name in ("work", "trash", "epochs", "steps"):
        expected.append((layout.ckpts, name, directory_))
    for name in (LOCK_FILE, HISTORY_FILE, INDEX_FILE, CACHE_FILE):
        expected.append((layout.ckpts, name, "a regular file"))
    problems: list[str] = []
    for parent, name, kind in expected:
        path = os.path.join(parent, name)
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if _kind(mode) != kind:
            found = describe(None, path)
            problems.append(f"'{path}' is {found}; expected {kind}")
            if path == layout.ckpts:
                return problems  # nothing below it is the tree's
    for holder, parse in ((layout.epochs, parse_epoch_dirname), (layout.steps, parse_step_dirname)):
        try:
            entries = list(os.scandir(holder))
        except OSError:  # absent, or already reported as not a directory
            continue
        for entry in entries:
            if parse(entry.name) is not None and not entry.is_dir(follow_symlinks=False):
                problems.append(
                    f"'{entry.path}' is {describe(None, entry.path)}; expected {directory_}"
                )
    return problems


def refuse_unsafe_tree(layout: CheckpointLayout) -> None:
    """Raise if `check_tree` finds anything: for a process about to write the tree.

    Raises:
        UnsafePathError: one line naming every such path, what it is and the remedy.
    """
    problems = check_tree(layout)
    if problems:
        raise UnsafePathError(f"{'; '.join(problems)}. {REMEDY}; nothing was written")


_PROC_FD = "/proc/self/fd"


def through_descriptor(dir_fd: int, path: str) -> str:
    """A path to the directory open as `dir_fd` that the kernel resolves through the
    descriptor (`/proc/self/fd/N`), for code that can only open files by path: a link
    swapped in for `path` or a directory above it is not followed. `path` itself where
    /proc is not mounted."""
    reached = f"{_PROC_FD}/{dir_fd}"
    try:
        same = os.path.samestat(os.stat(reached), os.fstat(dir_fd))
    except OSError:
        return path
    return reached if same else path


def named_by_path(error: OSError, reached: str, path: str) -> OSError:
    """`error` naming `path` where it names a file below `reached` (`through_descriptor`'s
    path of the same directory): messages name the tree's paths, not /proc's."""
    filename = error.filename
    if reached != path and isinstance(filename, str) and filename.startswith(reached):
        error.filename = path + filename[len(reached) :]
    return error
