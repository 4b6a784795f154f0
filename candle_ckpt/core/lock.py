"""One writer per checkpoint tree: an advisory lock on `ckpts/.lock`.

The writer takes the lock when training begins and releases it when training ends;
the kernel releases it when the process dies, however it dies, so a lock left by a
dead job never blocks the next one. The file holds the holder's pid, host and the
time it took the lock, for the error a second writer gets. Readers (`restart`, the
command line) never take it.

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

from .errors import WriterLockedError
from .logs import LibraryLogger

LOCK_FILE = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class WriterLock:
    """The advisory lock on `<ckpts>/.lock`, held by the process writing the tree.

    Args:
        ckpts: the tree's `ckpts/` directory (created if missing).
        logger: where to log that locking is unsupported.
    """

    def __init__(self, ckpts: str, logger: LibraryLogger) -> None:
        self.path = os.path.join(ckpts, LOCK_FILE)
        self.logger = logger
        self._fd: int | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (a no-op if this object holds it already).

        Raises:
            WriterLockedError: another open file holds it; names its pid, host and time.
        """
        if self.held:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WriterLockedError(
                f"'{self.path}' is held by another writer of this checkpoint tree: pid "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, writing "
                f"since {holder.get('started', '?')}; expected no other writer. Stop that "
                f"job, or give this one another ckpt_directory") from None
        except OSError as error:
            os.close(fd)
            if error.errno not in _UNSUPPORTED:
                raise
            self.logger.warning("cannot lock '%s' (%s): the file system does not support "
                                "locks; only one job may write this tree at a time",
                                self.path, error.strerror)
            return
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now(datetime.timezone.utc)
                             .isoformat(timespec="seconds")}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8"), 0)
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

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
