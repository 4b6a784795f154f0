"""Work that runs off the training thread: asynchronous saves and emptying the trash.

Deleting is slow here (about 0.33 s per GB on a file system mounted with `discard`,
0.7 s for a 300 MB epoch), and the training thread need not wait for it: an epoch to
delete is renamed into `ckpts/trash/` (durable, microseconds) and a background thread
removes it. A crash in between leaves the trash to be emptied by the next run.
"""

import concurrent.futures
import os
import threading

from . import durable
from .errors import CheckpointError

# The nice value of the threads that save and delete in the background (Linux applies
# it per thread): training keeps the cores when both want them, the writer takes what
# is left. Not 19: a writer that holds the GIL (h5py's metadata, the protocol's Python
# code) while it waits for a core would stall training in turn.
BACKGROUND_NICE = 10


def lower_thread_priority():
    """Give the calling thread the nice value BACKGROUND_NICE (no-op where unsupported).

    Threads it starts inherit the value (the CRC and fsync helpers of a save).
    """
    if not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return
    try:
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(own, BACKGROUND_NICE))
    except OSError:  # not permitted (a sandbox): run at the normal priority
        pass


class TrashCollector:
    """Empties one `trash/` directory in a background thread, whenever it is poked.

    Pokes while a collection is pending coalesce into it. At interpreter exit Python
    waits for the running collection, so a normal exit leaves no trash behind.

    Args:
        trash_dir: the directory to empty.
        logger: where failures are logged (a failed removal is retried at the next poke).
    """

    def __init__(self, trash_dir, logger):
        self.trash_dir = trash_dir
        self.logger = logger
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="candle_ckpt-trash",
            initializer=lower_thread_priority)
        self._lock = threading.Lock()
        self._pending = None

    def poke(self):
        """Schedule emptying the trash, unless a collection is already scheduled."""
        with self._lock:
            if self._pending is None or self._pending.running() or self._pending.done():
                self._pending = self._executor.submit(self._collect)

    def wait(self):
        """Block until the scheduled collections are done (for tests and shutdown)."""
        with self._lock:
            pending = self._pending
        if pending is not None:
            pending.result()

    def _collect(self):
        try:
            removed = durable.empty_trash(self.trash_dir)
        except OSError as error:
            self.logger.warning("emptying '%s' failed (%s); will retry at the next deletion",
                                self.trash_dir, error)
            return
        if removed:
            self.logger.debug("removed from trash: %s", ", ".join(removed))


class BackgroundWriter:
    """Runs one save at a time in a background thread (`ckpt_async`).

    `submit` first waits for the previous save, so at most one is in flight and at
    most one snapshot is held besides the model; an error in the background is raised
    by the next `submit` or `wait`, never lost. At interpreter exit Python waits for
    the running save, so it is finished, or killed with the process like a
    synchronous one (the protocol is the same).

    The thread runs at a lower priority (`lower_thread_priority`): on a machine whose
    cores training keeps busy, the save then takes longer but takes less from training.
    Once training waits for it (`wait`, or a `submit` while it runs) that would be a
    priority inversion, so the save is given the waiting thread's priority back for the
    rest of its run, where the system permits raising it.
    """

    def __init__(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="candle_ckpt-save")
        self._pending = None
        self._writer_thread_id = None

    def submit(self, job):
        """Wait for the previous job (raising its error), then start `job()`."""
        self.wait()
        self._pending = self._executor.submit(self._run, job)

    def wait(self):
        """Block until the current job is done; raise the exception it raised, if any."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if not pending.done() and self._writer_thread_id is not None:
            _share_priority(self._writer_thread_id)
        pending.result()

    def _run(self, job):
        self._writer_thread_id = threading.get_native_id()
        lower_thread_priority()
        return job()


def _share_priority(thread_id):
    """Give thread `thread_id` the calling thread's nice value, if that is allowed (an
    unprivileged process may not raise a priority it lowered: then nothing changes)."""
    if not hasattr(os, "setpriority"):
        return
    try:
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        if os.getpriority(os.PRIO_PROCESS, thread_id) > mine:
            os.setpriority(os.PRIO_PROCESS, thread_id, mine)
    except OSError:
        pass


def available_memory_bytes():
    """The host memory available to new allocations (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_snapshot_fits(nbytes, setting, off):
    """Raise unless a host-memory snapshot of `nbytes` fits in available memory.

    Args:
        nbytes: the snapshot's size.
        setting: what needs the snapshot, for the message (e.g. "ckpt_async=true").
        off: the setting that needs none (e.g. "ckpt_async=false").

    Raises:
        CheckpointError: naming the bytes needed, the bytes available and the way out.
    """
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise CheckpointError(
            f"{setting} needs a host-memory snapshot of the training state, "
            f"{nbytes / 1e6:.0f} MB, but only {available / 1e6:.0f} MB are available "
            f"(MemAvailable); expected the snapshot to fit: free memory or set {off}")
