"""ckpts/history.jsonl: every completed epoch of every run, saved or not, append-only.

The training job's writer appends one JSON object per line (docs/FORMAT.md, "The
history file"): a `start` line when a run records its first epoch, an `epoch` line at
every epoch's end, a `saved` line once an epoch's checkpoint is complete. Each line is
one `write` on a descriptor opened with O_APPEND, so a kill -9 leaves at most the last
line torn; the next writer ends such a line before appending, and readers skip it.

`read_history` rebuilds the timelines: a `start` line resuming from epoch R (a restart
after a kill, or after an operator's rollback) abandons every epoch after R recorded
earlier, so each epoch appears once on the live timeline, and the epochs a restart or
rollback left behind are marked abandoned. A damaged file is read past the damage with
one warning per damaged line; it never stops a restart, which does not read it at all.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, BinaryIO

from ..errors import UnsafePathError
from ..storage.checksum import crc32
from ..storage.durable import append_line
from ..storage.tree_fs import open_file
from . import history_cache
from .info import read_run_id
from .json_lines import json_line
from .layout import HISTORY_FILE, epoch_dirname
from .timelines import EpochRecord, History, Timelines

# A line is a few hundred bytes; a far larger file is not a history, and reading it
# whole would be a denial of service (about 4 million epochs fit).
MAX_HISTORY_BYTES = 1 << 30


def utc_time(seconds: float) -> str:
    """`seconds` since the epoch as "2026-12-03T08:45:40Z"."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class HistoryWriter:
    """Appends the lines of one run to `<ckpts>/history.jsonl` (thread-safe).

    Lines are not fsynced one by one: a killed process loses nothing it wrote (the
    data is in the kernel), and a machine crash loses at most the epochs since the last
    save, which the restarted run trains and records again. A `saved` line is fsynced,
    so that the history holds every saved epoch that `last` can name.

    Args:
        ckpts: the tree's `ckpts/` directory (created if missing; the file and it are
            reached without following a link: `durable.append_line`).
        run: the fields of the run's `start` line (run_id, run_started, lineage_id).
    """

    def __init__(self, ckpts: str, run: Mapping[str, Any]) -> None:
        self.path = os.path.join(ckpts, HISTORY_FILE)
        self._root = os.path.dirname(ckpts)
        self._run = dict(run)
        self._lock = threading.Lock()
        self._started = False

    def record_epoch(
        self, epoch: int, metrics: Mapping[str, float | None], train_seconds: float | None
    ) -> None:
        """The 1-based `epoch` completed with `metrics`; the first one starts the run."""
        with self._lock:
            if not self._started:
                self._append(
                    {
                        "kind": "start",
                        **self._run,
                        "resumed_from": epoch - 1 if epoch > 1 else None,
                    },
                    sync=True,
                )
                self._started = True
            self._append(
                {
                    "kind": "epoch",
                    "run_id": self._run["run_id"],
                    "epoch": epoch,
                    "time": utc_time(time.time()),
                    "metrics": dict(metrics),
                    "train_seconds": _rounded(train_seconds),
                },
                sync=False,
            )

    def record_saved(self, epoch: int, reason: str, save_seconds: float) -> None:
        """Epoch `epoch`'s checkpoint is complete (`last` names it)."""
        with self._lock:
            self._append(
                {
                    "kind": "saved",
                    "run_id": self._run["run_id"],
                    "epoch": epoch,
                    "reason": reason,
                    "save_seconds": _rounded(save_seconds),
                },
                sync=True,
            )

    def record_step_saved(self, epoch: int, batch: int, reason: str, save_seconds: float) -> None:
        """The step checkpoint after `epoch` epochs and `batch` batches is complete
        (`last_step` names it). A kind of its own: a reader that knows nothing of step
        checkpoints skips it, and no epoch shows as saved for it."""
        with self._lock:
            self._append(
                {
                    "kind": "step_saved",
                    "run_id": self._run["run_id"],
                    "epoch": epoch,
                    "batch": batch,
                    "reason": reason,
                    "save_seconds": _rounded(save_seconds),
                },
                sync=True,
            )

    def _append(self, record: dict[str, Any], sync: bool) -> None:
        append_line(self._root, self.path, history_line(record), sync=sync)


def history_line(record: Mapping[str, Any]) -> bytes:
    """One line of the history file: compact strict JSON and a newline."""
    return json_line(record)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(max(seconds, 0.0), 6)


# -- reading ---------------------------------------------------------------------------


def history_path(ckpts: str) -> str:
    """The history file of the tree whose `ckpts/` directory is `ckpts`."""
    return os.path.join(ckpts, HISTORY_FILE)


def read_history(ckpts: str, last: int | None = None, *, cache: bool = False) -> History:
    """Read `<ckpts>/history.jsonl` (see the module docstring); never raises for damage.

    `last`: the epoch the `last` link names, or None; the live timeline is then the one
    that led to it (`_follow_last`), and live epochs after it are marked `after_last`.
    `cache`: use `<ckpts>/history.cache` (core/format/history_cache.py) for the lines it covers,
    and write a new one when many lines were not covered; the result is the same.

    Returns an empty `History` when the file does not exist (a tree written before the
    history existed, or by upstream CANDLE), and one with a warning when it is a link
    or not a regular file, which is not read.

    Raises:
        OSError: the file exists but cannot be read (permissions, I/O error).
    """
    path = history_path(ckpts)
    try:
        stream = open(path, "rb", opener=_open_no_link)
    except FileNotFoundError:
        return History(path, [], [], [], [])
    except UnsafePathError as error:
        return History(path, [], [], [str(error)], [])
    with stream:
        size = os.fstat(stream.fileno()).st_size
        if cache and 0 < size <= MAX_HISTORY_BYTES:
            timelines = _read_with_cache(ckpts, path, stream, size)
        else:
            timelines = _read_every_line(path, stream)
    history = timelines.history()
    if last is not None:
        _follow_last(history, last, read_run_id(os.path.join(ckpts, "epochs", epoch_dirname(last))))
    return history


def _open_no_link(path: str, flags: int) -> int:
    """`open`'s opener for a file the library wrote: never through a link, never a pipe."""
    return open_file(None, path, path, flags)


def _follow_last(history: History, last: int, run_id: str | None) -> None:
    """Make the live timeline the one that led to the checkpoint `last` names, written by
    run `run_id`; mark the live epochs after `last` `after_last`.

    The lines alone make the live timeline the newest run's. After a rollback to an
    epoch a later run had abandoned (a run from scratch by mistake, rolled back to the
    epoch 60 of the run before), `last` names an epoch off that timeline; the timeline
    leading to it is rebuilt backwards: the epochs its run recorded after the one it
    resumed from, then the saved epoch of that lineage it resumed from, and so on back
    to a run started from scratch. Every other epoch up to `last` is abandoned. Without
    the record of `last` (no run_id: files older than format 2; a damaged history), the
    lines' timeline stands.
    """
    epochs = history.epochs
    target = next(
        (
            index
            for index in range(len(epochs) - 1, -1, -1)
            if epochs[index].epoch == last and epochs[index].run_id == run_id
        ),
        None,
    )
    if target is None:
        for record in epochs:
            if record.epoch > last and not record.abandoned:
                record.after_last = True
        return
    for record in epochs[target + 1 :]:  # a later run's epochs, or a running job's
        if record.epoch > last:
            record.after_last = not record.abandoned
        else:
            record.abandoned = True
    resumed_from = {run.run_id: run.resumed_from or 0 for run in history.runs}
    lineage_of = {run.run_id: run.lineage_id for run in history.runs}
    index: int | None = target
    while index is not None:
        index = _walk_back(epochs, index, last, resumed_from, lineage_of)


def _walk_back(
    epochs: list[EpochRecord],
    start: int,
    last: int,
    resumed_from: Mapping[str, int],
    lineage_of: Mapping[str, str | None],
) -> int | None:
    """Mark the records up to `start` (backwards, in one pass) on or off the timeline
    that ends at `epochs[start]`; epochs after `last` only get `after_last`.

    Returns None when done, or the index of the record to walk back from again: when no
    saved epoch a run could have resumed from was found, the latest unsaved one (its
    `saved` line lost to a crash after `last` was repointed, docs/FORMAT.md step 9).
    """
    run, expected = epochs[start].run_id, epochs[start].epoch  # next epoch to find on it
    resumed, lineage = resumed_from.get(run, 0), lineage_of.get(run)
    unsaved: int | None = None
    for index in range(start, -1, -1):
        record = epochs[index]
        epoch = record.epoch
        if epoch > last:
            record.after_last = not record.abandoned
            continue
        record.abandoned = True
        if expected == 0:
            continue
        if record.run_id == run and resumed < epoch <= expected:
            record.abandoned, expected = False, epoch - 1
        elif epoch == resumed != 0 and lineage_of.get(record.run_id) == lineage:
            if not record.saved:  # kept in case no saved one comes
                unsaved = index if unsaved is None else unsaved
                continue
            # the checkpoint `run` resumed from: follow its run back
            record.abandoned, unsaved = False, None
            run, expected = record.run_id, epoch - 1
            resumed = resumed_from.get(run, 0)
    return unsaved if expected != 0 else None


def _read_every_line(path: str, stream: BinaryIO) -> Timelines:
    data = stream.read(MAX_HISTORY_BYTES + 1)
    if len(data) <= MAX_HISTORY_BYTES:
        timelines = Timelines(path)
    else:
        timelines = Timelines(
            path,
            line_warnings=[
                f"{path}: larger than {MAX_HISTORY_BYTES} bytes; read the first "
                f"{MAX_HISTORY_BYTES} only"
            ],
        )
        data = data[:MAX_HISTORY_BYTES]
    timelines.feed_data(data)
    return timelines


def _read_with_cache(ckpts: str, path: str, stream: BinaryIO, size: int) -> Timelines:
    # Mapped, not read: the bytes the cache covers are only checksummed.
    with mmap.mmap(stream.fileno(), size, prot=mmap.PROT_READ) as mapped:
        found = history_cache.load(ckpts, path, mapped)
    timelines, covered, covered_crc32 = (Timelines(path), 0, 0) if found is None else found
    stream.seek(covered)
    # Never past the limit, even if the file grew past it since `size`.
    rest = stream.read(MAX_HISTORY_BYTES - covered)
    timelines.feed_data(rest)
    lines = rest.rfind(b"\n") + 1
    if lines >= history_cache.REWRITE_AFTER_BYTES:
        crc = crc32(memoryview(rest)[:lines], covered_crc32)
        history_cache.store(ckpts, history_cache.Cached(timelines, covered + lines, crc))
    return timelines
