"""The timelines of a history file: its records (`EpochRecord`, `RunStart`), what a read
found (`History`), and `Timelines`, which rebuilds them from the lines fed in file order.

`history.read_history` feeds it the lines of ckpts/history.jsonl; `history_cache` saves
its state after the lines a cache covers and restores it, so that a later read feeds
only the lines appended since.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Any, NamedTuple

from .json_lines import parse_lines

# Warnings listed of each kind (lines not JSON, records not history lines).
_MAX_WARNINGS = 20


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
