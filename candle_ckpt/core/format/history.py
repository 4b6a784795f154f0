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
from itertools import chain
from operator import attrgetter
from typing import Any, BinaryIO, NamedTuple

from ..errors import UnsafePathError
from ..storage.checksum import crc32
from ..storage.durable import append_line
from ..storage.tree_fs import open_file
from .info import read_run_id
from .json_lines import json_line, parse_lines
from .layout import epoch_dirname

HISTORY_FILE = "history.jsonl"
# A line is a few hundred bytes; a far larger file is not a history, and reading it
# whole would be a denial of service (about 4 million epochs fit).
MAX_HISTORY_BYTES = 1 << 30
# Warnings listed of each kind (lines not JSON, records not history lines).
_MAX_WARNINGS = 20


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

    def _append(self, record: dict[str, Any], sync: bool) -> None:
        append_line(self._root, self.path, history_line(record), sync=sync)


def history_line(record: Mapping[str, Any]) -> bytes:
    """One line of the history file: compact strict JSON and a newline."""
    return json_line(record)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(max(seconds, 0.0), 6)


# -- reading ---------------------------------------------------------------------------


# A plain class and NamedTuples, not dataclasses: see `core.format.info.CheckpointInfo`.


class EpochRecord:
    """One completed epoch of one run, as the history recorded it.

    `abandoned` is True when a later run resumed from an earlier epoch (a restart after
    a kill re-trains the epochs after its checkpoint; a rollback abandons the epochs
    after the epoch rolled back to). `after_last` is True for an epoch not abandoned yet
    but after the epoch `last` names (`read_history(last=...)`): the next run resumes
    from `last` and abandons it, unless it is a running job's epoch not saved yet.
    `saved` is True once a `saved` line followed.
    """

    __slots__ = (
        "abandoned",
        "after_last",
        "epoch",
        "metrics",
        "run_id",
        "save_seconds",
        "saved",
        "time",
        "train_seconds",
    )

    def __init__(
        self,
        epoch: int,
        run_id: str,
        time: str | None,
        metrics: dict[str, float | None],
        train_seconds: float | None,
        saved: bool = False,
        save_seconds: float | None = None,
        abandoned: bool = False,
        after_last: bool = False,
    ) -> None:
        self.epoch = epoch
        self.run_id = run_id
        self.time = time
        self.metrics = metrics
        self.train_seconds = train_seconds
        self.saved = saved
        self.save_seconds = save_seconds
        self.abandoned = abandoned
        self.after_last = after_last

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"EpochRecord({fields})"


class RunStart(NamedTuple):
    """A `start` line: which run, when, and the epoch it resumed after (None: scratch)."""

    run_id: str
    run_started: str | None
    lineage_id: str | None
    resumed_from: int | None


class History(NamedTuple):
    """What `read_history` found: epochs in file order, runs, warnings about damage,
    and `rewinds`: the epochs runs resumed from that abandoned recorded epochs, in file
    order."""

    path: str
    epochs: list[EpochRecord]
    runs: list[RunStart]
    warnings: list[str]
    rewinds: list[int]

    @property
    def live(self) -> list[EpochRecord]:
        """The epochs of the live timeline up to `last`, in epoch order, each once."""
        return sorted(
            (e for e in self.epochs if not e.abandoned and not e.after_last),
            key=attrgetter("epoch"),
        )

    @property
    def metric_names(self) -> list[str]:
        """Every metric any epoch recorded, in the order they first appear."""
        return list(dict.fromkeys(chain.from_iterable(record.metrics for record in self.epochs)))


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
    # Imported here: the cache module builds this module's records.
    from . import history_cache

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


def _warn(warnings: list[str], message: str) -> None:
    if len(warnings) < _MAX_WARNINGS:
        warnings.append(message)
    elif len(warnings) == _MAX_WARNINGS:
        warnings.append("further damaged lines are not reported")


class Timelines:
    """The timelines rebuilt from a history's records, fed in file order.

    Feeding can stop and go on: `history_cache` saves the state after the lines a cache
    covers, and a later read feeds only the lines appended since.

    Args:
        path: the history file, named in warnings.
        epochs, runs, rewinds: the state after `records` records (empty for a read
            from the first line).
        line_warnings, record_warnings: about the lines that are not JSON, and the
            records that are not history lines, each in file order: a `History` lists
            the first, then the second, so that a read that starts from a cached state
            lists them as a read of every line does.
        lines, records: how many lines and records (parsed lines) were fed before.
    """

    def __init__(
        self,
        path: str,
        epochs: list[EpochRecord] | None = None,
        runs: list[RunStart] | None = None,
        rewinds: list[int] | None = None,
        line_warnings: list[str] | None = None,
        record_warnings: list[str] | None = None,
        lines: int = 0,
        records: int = 0,
    ) -> None:
        self.path = path
        self.epochs = [] if epochs is None else epochs
        self.runs = [] if runs is None else runs
        self.rewinds = [] if rewinds is None else rewinds
        self.line_warnings = [] if line_warnings is None else line_warnings
        self.record_warnings = [] if record_warnings is None else record_warnings
        self.lines = lines
        self.records = records
        # epoch -> its record on the live timeline: the records no later line abandoned
        self._live = {record.epoch: record for record in self.epochs if not record.abandoned}
        # (run_id, epoch) -> its last record; only a `saved` line needs it, so it is
        # built when the first one is fed
        self._by_run: dict[tuple[str, int], EpochRecord] | None = None if self.epochs else {}

    def history(self) -> History:
        warnings = self.line_warnings + self.record_warnings
        return History(self.path, self.epochs, self.runs, warnings, self.rewinds)

    def feed_data(self, data: bytes) -> None:
        """Feed the complete lines of `data`, which follows the lines fed before."""
        first = self.lines
        values = parse_lines(
            [data],
            lambda number, error: _warn(
                self.line_warnings,
                f"{self.path}: line {first + number} is not JSON ({error}); skipped (a "
                f"line torn by a kill, or damage)",
            ),
        )
        self.lines += data.count(b"\n")
        self.feed(values)

    def feed(self, records: list[Any]) -> None:
        """Feed parsed lines, in file order."""
        epochs, live, runs, rewinds = self.epochs, self._live, self.runs, self.rewinds
        by_run = self._by_run
        append = epochs.append
        for number, record in enumerate(records, self.records + 1):
            try:
                kind = record["kind"]
                if kind == "epoch":  # first: half the lines of a history, and the most work
                    metrics = record["metrics"]
                    if type(metrics) is not dict:
                        raise TypeError(f"'metrics' is {metrics!r}; expected an object")
                    epoch, run_id = int(record["epoch"]), str(record["run_id"])
                    entry = EpochRecord(
                        epoch, run_id, record.get("time"), metrics, record.get("train_seconds")
                    )
                    previous = live.get(epoch)
                    if previous is not None:  # a run recorded the same epoch twice
                        previous.abandoned = True
                    live[epoch] = entry
                    if by_run is not None:
                        by_run[run_id, epoch] = entry
                    append(entry)
                elif not isinstance(kind, str):  # no other JSON value equals "epoch"
                    raise TypeError(f"'kind' is {kind!r}; expected a string")
                elif kind == "saved":
                    if by_run is None:
                        by_run = self._by_run = {(e.run_id, e.epoch): e for e in epochs}
                    found = by_run.get((str(record["run_id"]), int(record["epoch"])))
                    if found is not None:
                        found.saved, found.save_seconds = True, record.get("save_seconds")
                elif kind == "start":
                    resumed = record.get("resumed_from")
                    runs.append(
                        RunStart(
                            str(record["run_id"]),
                            record.get("run_started"),
                            record.get("lineage_id"),
                            None if resumed is None else int(resumed),
                        )
                    )
                    after = resumed or 0
                    left = [e for e in live if e > after]
                    for epoch in left:
                        live.pop(epoch).abandoned = True
                    if left:
                        rewinds.append(after)
                # another kind: a line of a later version, which this reader skips
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                _warn(
                    self.record_warnings,
                    f"{self.path}: record {number} is not a history line "
                    f"({type(error).__name__}: {error}); skipped",
                )
        self.records += len(records)
