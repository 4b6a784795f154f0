"""One writer per checkpoint tree: an advisory lock on `ckpts/.lock`.

The writer takes the lock when training begins and releases it when training ends;
the kernel releases it when the process dies, however it dies, so a lock left by a
dead job never blocks the next one. The file holds the holder's pid, host and the
time it took the lock, for the error a second writer gets. The restart of a process
that will write checks it (a shared lock, dropped at once) before reading anything, so a
second job is refused before it loads a checkpoint; the command line's readers (list,
info, verify) never touch it.

`flock(2)` is used rather than POSIX record locks (`fcntl(F_SETLK)`): it belongs to the
open file, so two writers in one process are caught too, and closing another
descriptor of the file does not drop it. Linux NFS clients map it to NFS byte-range
locks, so writers on different nodes see each other. A file system without locking
(Lustre mounted without `flock`) is logged and the run goes on unlocked.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import weakref
from typing import Any

from ..errors import WriterLockedError
from ..format.layout import LOCK_FILE
from ..logs import LibraryLogger
from ..storage import tree_fs

TRAINING_REMEDY = "Stop that job, or give this one another ckpt_directory (--ckpt_directory)"
OPERATOR_REMEDY = (
    "Run this command between jobs: wait for that job to end (or stop "
    "it), then run it again; nothing was changed"
)
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class WriterLock:
    """The advisory lock on `<ckpts>/.lock`, held by the process writing the tree.

    Args:
        ckpts: the tree's `ckpts/` directory (created if missing).
        logger: where to log that locking is unsupported.
        remedy: the error's advice to a second writer (TRAINING_REMEDY, OPERATOR_REMEDY).
    """

    def __init__(self, ckpts: str, logger: LibraryLogger, remedy: str = TRAINING_REMEDY) -> None:
        self.path = os.path.join(ckpts, LOCK_FILE)
        self.logger = logger
        self.remedy = remedy
        self._fd: int | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (a no-op if this object holds it already).

        Raises:
            WriterLockedError: another open file holds it; names its pid, host and time.
            UnsafePathError: `.lock` or `ckpts/` is a link or of the wrong kind.
        """
        if self.held:
            return
        fd = self._open(os.O_RDWR | os.O_CREAT)
        if not self._try_flock(fd, fcntl.LOCK_EX):
            return
        record = (
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"
                    ),
                }
            )
            + "\n"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8"), 0)
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def check_free(self) -> None:
        """Raise if another writer holds the lock now; take nothing, create nothing.

        For the restart of a job that will write: it is refused before it reads and
        loads a checkpoint it could never continue (the lock itself is taken when
        training begins).

        Raises:
            WriterLockedError, UnsafePathError: as `acquire`.
        """
        if self.held:
            return
        try:
            fd = self._open(os.O_RDONLY)
        except FileNotFoundError:
            return  # no writer ever ran here
        if self._try_flock(fd, fcntl.LOCK_SH):
            os.close(fd)  # closing the only descriptor of this open file drops the lock

    def _open(self, flags: int) -> int:
        """Open the lock file, never through a link (`tree_fs.open_tree_file`)."""
        ckpts = os.path.dirname(self.path)
        return tree_fs.open_tree_file(os.path.dirname(ckpts), self.path, flags)

    def _try_flock(self, fd: int, operation: int) -> bool:
        """flock `fd` (LOCK_EX or LOCK_SH); True if locked, False if the file system cannot lock
        (logged, `fd` closed). On refusal `fd` is closed and WriterLockedError raised."""
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WriterLockedError(self._refusal(holder)) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in _UNSUPPORTED:
                raise
            self.logger.warning(
                "cannot lock '%s' (%s): the file system does not support "
                "locks; only one job may write this tree at a time",
                self.path,
                error.strerror,
            )
            return False
        return True

    def _refusal(self, holder: dict[str, Any]) -> str:
        """The message of the WriterLockedError for the lock's `holder` (its record)."""
        since = holder.get("started", "?")
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            # flock belongs to the open file: this process's own training, not yet ended,
            # holds it through another descriptor
            return (
                f"'{self.path}' is held by this process (pid {os.getpid()}, since {since}): "
                f"a training of this checkpoint tree in this process has not ended; "
                f"expected no other writer. Its end releases the lock (Keras: model.fit "
                f"returning, or the callback's on_train_end(); PyTorch: "
                f"CandleCkptPyTorch.finish(), run at the last epoch), as does this "
                f"process's exit: call restart() once, before training"
            )
        return (
            f"'{self.path}' is held by another writer of this checkpoint tree: pid "
            f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, writing "
            f"since {since}; expected no other writer. {self.remedy}"
        )

    def release(self) -> None:
        """Drop the lock (a no-op if it is not held). The file stays; it is harmless."""
        if self._finalizer is not None:
            self._finalizer()
        self._fd = self._finalizer = None


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder's record, or {} if it cannot be read (it may be writing it right now)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
