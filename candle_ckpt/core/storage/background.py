"""Work that runs off the training thread: asynchronous saves and emptying the trash.

Deleting an epoch takes time in proportion to its size (more on a file system mounted
with `discard`; benchmarks/bench_prune.py measures it), and the training thread need
not wait for it: an epoch to delete is renamed into `ckpts/trash/` (one durable rename)
and a background thread removes it. A crash in between leaves the trash to be emptied
by the next run. `SharedThread` is the one helper thread a kind of work (CRC, fsync)
reuses across files and saves.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import CheckpointError, UnsafePathError
from ..format.layout import CheckpointLayout
from ..logs import LibraryLogger
from . import trash

Result = TypeVar("Result")

# The nice value of the threads that save and delete in the background (Linux applies
# it per thread): training keeps the cores when both want them, the writer takes what
# is left. Not 19: a writer that holds the GIL (h5py's metadata, the protocol's Python
# code) while it waits for a core would stall training in turn.
BACKGROUND_NICE = 10


def lower_thread_priority() -> None:
    """Give the calling thread the nice value BACKGROUND_NICE (no-op where unsupported).

    Threads it starts inherit the value; a `SharedThread` task runs at least at it.
    """
    _nice_at_least(BACKGROUND_NICE)


def _thread_nice() -> int | None:
    """The calling thread's nice value, None where Linux's per-thread value is absent."""
    if not hasattr(os, "getpriority") or not hasattr(threading, "get_native_id"):
        return None
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return None


def _nice_at_least(value: int) -> None:
    """Raise the calling thread's nice value to `value` if it is lower (never lowers it:
    that needs a privilege)."""
    own = _thread_nice()
    if own is None or own >= value:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)
    except OSError:  # not permitted (a sandbox): run at the normal priority
        pass


def _run_at_nice(nice: int | None, function: Callable[..., Result], *args: Any) -> Result:
    if nice is not None:
        _nice_at_least(nice)
    return function(*args)


class SharedThread:
    """One worker thread, started on first use and shared by every caller, so that a
    save does not start (and join) a thread per file; tasks run in submission order, at
    least at the submitting thread's nice value (a background save's helpers stay
    background work).

    A child forked while it exists (a DataLoader worker) gets an executor of its own on
    first use: the parent's thread does not exist in the child.

    Args:
        name: the thread's name prefix, e.g. "candle_ckpt-crc".
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def submit(
        self, function: Callable[..., Result], *args: Any
    ) -> concurrent.futures.Future[Result]:
        """Run `function(*args)` in the thread; returns its future."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=self.name
                )
            return self._executor.submit(_run_at_nice, _thread_nice(), function, *args)

    def _forget(self) -> None:
        self._executor = None
        self._lock = threading.Lock()


class TrashCollector:
    """Empties one `trash/` directory in a background thread, whenever it is poked.

    Pokes while a collection is pending coalesce into it. At interpreter exit Python
    waits for the running collection, so a normal exit leaves no trash behind.

    Args:
        layout: the tree whose `trash/` to empty (`trash.empty_trash`).
        logger: where failures are logged (a failed removal is retried at the next poke).
    """

    def __init__(self, layout: CheckpointLayout, logger: LibraryLogger) -> None:
        self.layout = layout
        self.logger = logger
        self._reported: set[str] = set()  # foreign entries, warned about once
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="candle_ckpt-trash", initializer=lower_thread_priority
        )
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future[None] | None = None

    def poke(self) -> None:
        """Schedule emptying the trash, unless a collection is already scheduled."""
        with self._lock:
            if self._pending is None or self._pending.running() or self._pending.done():
                self._pending = self._executor.submit(self._collect)

    def wait(self) -> None:
        """Block until the scheduled collections are done (for tests and shutdown)."""
        with self._lock:
            pending = self._pending
        if pending is not None:
            pending.result()

    def _collect(self) -> None:
        try:
            removed, foreign = trash.empty_trash(self.layout)
        except (OSError, UnsafePathError) as error:
            self.logger.warning(
                "emptying '%s' failed (%s); will retry at the next deletion",
                self.layout.trash,
                error,
            )
            return
        if removed:
            self.logger.debug("removed from trash: %s", ", ".join(removed))
        foreign = [name for name in foreign if name not in self._reported]
        if foreign:
            self._reported.update(foreign)
            self.logger.warning(
                "left %s in '%s': not named as the library names what it moves there",
                ", ".join(foreign),
                self.layout.trash,
            )


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

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="candle_ckpt-save"
        )
        self._pending: concurrent.futures.Future[Any] | None = None
        self._writer_thread_id: int | None = None

    def submit(self, job: Callable[[], Any]) -> None:
        """Wait for the previous job (raising its error), then start `job()`."""
        self.wait()
        self._pending = self._executor.submit(self._run, job)

    def wait(self) -> None:
        """Block until the current job is done; raise the exception it raised, if any."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if not pending.done() and self._writer_thread_id is not None:
            _share_priority(self._writer_thread_id)
        pending.result()

    def _run(self, job: Callable[[], Any]) -> Any:
        self._writer_thread_id = threading.get_native_id()
        lower_thread_priority()
        return job()


def _share_priority(thread_id: int) -> None:
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


def available_memory_bytes() -> int | None:
    """The host memory available to new allocations (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_snapshot_fits(nbytes: int, setting: str, off: str) -> None:
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
            f"(MemAvailable); expected the snapshot to fit: free memory or set {off}"
        )
