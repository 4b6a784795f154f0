"""What a checkpoint tree holds, surveyed quickly and without changing anything.

`survey` gathers what an operator looks at before deciding anything: every epoch
directory in numeric order with a summary of its ckpt-info.json, where `last` and
`best` point (or why they do not), which epochs lie after `last` (a timeline abandoned
by a rollback), and leftovers of an interrupted save or deletion.

It never reads a model file, and reads each ckpt-info.json only up to the keys a
summary shows (`json_head`): the library writes them before `epochs_saved` (format 1,
the list that makes the files of a long run large) and before `run_id` (format 2). A
survey parses no more than it shows, and validating every file against the schema
would take far longer, so a survey does not validate; `read_epoch_info` does, for the
one epoch an operator acts on.

The job writing a tree may prune an epoch between the scan of `epochs/` and the read
of its ckpt-info.json: such an epoch is left out, as if the scan had come a moment
later; `last` and `best` are each read as they were at one instant (`link_state`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from operator import itemgetter

from ..core.errors import CheckpointError, LinkError, NoCheckpointError
from ..core.format.index import FIELDS, decoded_metrics, read_index, size_and_checksummed
from ..core.format.info_keys import MAX_INFO_BYTES, finite_or_none, is_legacy
from ..core.format.layout import (
    DEFAULT_CKPT_DIRECTORY,
    INFO_FILE,
    LINK_NAMES,
    CheckpointLayout,
    epoch_dirname,
    parse_epoch_dirname,
)
from ..core.format.locate import locate
from .json_head import HeadReader

TYPE_CHECKING = False  # typing's, without importing typing: see core/format/info_keys.py
if TYPE_CHECKING:
    from typing import Any

# What a summary shows: every upstream key (`checkpoint_info` needs them) and the keys
# `list` shows. All of them precede the stop keys in the files the library writes.
SUMMARY_KEYS = (
    "format",
    "format_version",
    "epoch",
    "model_file",
    "checksum",
    "save_best_metric",
    "best_metric_last",
    "timestamp",
    "time_elapsed",
    "metadata",
    "files",
    "best_metric_mode",
    "epoch_best",
)
STOP_KEYS = ("run_id", "epochs_saved")  # format 2's first: the files a run writes
_HEAD_READER = HeadReader(SUMMARY_KEYS, STOP_KEYS, MAX_INFO_BYTES)
_SEP_INFO_FILE = os.sep + INFO_FILE


def open_tree(directory: str) -> CheckpointLayout:
    """The `CheckpointLayout` of `directory`, which must hold a checkpoint tree.

    `directory` is a `ckpt_directory`, found by the rule a training run follows
    (`core.format.locate`): a tree of upstream CANDLE's layout in it, or `<directory>/ckpts`.

    Raises:
        CheckpointError: `directory` does not exist or holds no tree; trees at two
            places the rule looks (ParameterValueError).
    """
    layout = locate(directory, f"the directory {directory!r}")
    if not os.path.isdir(layout.root):
        raise CheckpointError(
            f"'{layout.root}' does not exist or is not a directory; "
            f"expected a ckpt_directory (default {DEFAULT_CKPT_DIRECTORY})"
        )
    if not os.path.isdir(layout.ckpts):
        raise CheckpointError(
            f"'{layout.root}' is not a checkpoint tree: it has no "
            f"'ckpts/' directory, nor epochs/ or last of its own; expected a ckpt_directory "
            f"(default {DEFAULT_CKPT_DIRECTORY})"
        )
    return layout


def require_epoch_dir(layout: CheckpointLayout, epoch: int) -> None:
    """Raise NoCheckpointError, naming the epochs there are, if `epoch` has no directory."""
    if not os.path.isdir(layout.epoch_dir(epoch)):
        raise NoCheckpointError(
            f"epoch {epoch}: '{layout.epoch_dir(epoch)}' does not exist; "
            f"epochs on disk: {describe_epochs(layout.list_epochs())}"
        )


# Plain classes, not NamedTuples or dataclasses: `list` imports neither `typing` nor
# `dataclasses` (core/format/info_keys.py).


class LinkState:
    """Where a `last`/`best` link points.

    `target` is what the link stores (None when absent or not a link), `epoch` the
    epoch it resolves to (None when absent, dangling or invalid), and `problem` None,
    or why the link cannot be followed.
    """

    __slots__ = ("epoch", "name", "problem", "target")

    def __init__(
        self, name: str, target: str | None, epoch: int | None, problem: str | None
    ) -> None:
        self.name = name
        self.target = target
        self.epoch = epoch
        self.problem = problem

    def as_dict(self) -> dict[str, Any]:
        """{"name", "target", "epoch", "problem"}: the link as `list --json` prints it."""
        return {
            "name": self.name,
            "target": self.target,
            "epoch": self.epoch,
            "problem": self.problem,
        }

    def describe(self) -> str:
        """One line: "last -> epochs/005", "best: absent", or the problem."""
        if self.problem is not None:
            return f"{self.name}: {self.problem}"
        if self.target is None:
            return f"{self.name}: absent"
        return f"{self.name} -> {self.target}"


LINK_READS = 5
"""How many times `link_state` reads a link that a writer keeps repointing."""


def link_state(layout: CheckpointLayout, name: str) -> LinkState:
    """The `LinkState` of the `last` or `best` link of `layout`, as it was at one instant.

    A job repoints its links at every save and then prunes the epoch a link named
    before: a link read while that happens could pair the target of one readlink with
    the resolution of the next, or resolve a target pruned meanwhile ("dangling"). The
    state counts only when the link still stores the same target afterwards; else it
    is read again (at most LINK_READS times). A link that dangles while it stays the
    same is reported as dangling.
    """
    path = layout.link(name)
    state = _link_state_once(layout, name, path)
    for _ in range(LINK_READS - 1):
        if _stored_target(path) == state.target:
            break
        state = _link_state_once(layout, name, path)
    return state


def _stored_target(path: str) -> str | None:
    """What the link at `path` stores; None when there is no link."""
    try:
        return os.readlink(path)
    except OSError:  # absent, or not a link
        return None


def _link_state_once(layout: CheckpointLayout, name: str, path: str) -> LinkState:
    target = _stored_target(path)
    try:
        epoch = layout.resolve_link(name)
    except LinkError as error:
        return LinkState(name, target, None, str(error))
    if epoch is None and target is not None:
        return LinkState(
            name, target, None, f"'{path}' -> '{target}' is dangling (the epoch it names is gone)"
        )
    return LinkState(name, target, epoch, None)


class EpochSummary:
    """One epoch directory as `candle-ckpt list` shows it.

    `size` is the bytes ckpt-info.json records (legacy CANDLE files record none: the
    bytes of the directory's files). `checksum` is "not verified" when CRC32s are
    recorded (a survey reads no model file) and "off" when none are. `best_value` is
    `best_metric_last`, the best value of `metric` up to this epoch; `metrics` the
    epoch's own values (None in files older than format 2, which do not record them),
    and `metric_value` its own value of `metric` (None when not recorded).
    `problem` is None or why the ckpt-info.json cannot be summarised; the other fields
    are then None.
    """

    __slots__ = (
        "best_value",
        "checksum",
        "directory",
        "epoch",
        "format_version",
        "legacy",
        "metric",
        "metric_value",
        "metrics",
        "problem",
        "size",
        "timestamp",
    )

    def __init__(
        self,
        epoch: int,
        directory: str,
        timestamp: str | None = None,
        metric: str | None = None,
        best_value: float | None = None,
        size: int | None = None,
        checksum: str | None = None,
        legacy: bool | None = None,
        problem: str | None = None,
        metrics: dict[str, Any] | None = None,
        format_version: int | None = None,
        metric_value: float | None = None,
    ) -> None:
        self.epoch = epoch
        self.directory = directory
        self.timestamp = timestamp
        self.metric = metric
        self.best_value = best_value
        self.size = size
        self.checksum = checksum
        self.legacy = legacy
        self.problem = problem
        self.metrics = metrics
        self.format_version = format_version
        self.metric_value = metric_value

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"EpochSummary({fields})"


def summarise_epoch(layout: CheckpointLayout, epoch: int) -> EpochSummary | None:
    """The `EpochSummary` of one epoch directory (never raises for a bad file); None
    when the directory went away while it was read (pruned by the job writing the tree)."""
    directory = layout.epoch_dir(epoch)
    row = _summarise(epoch, directory)
    return None if row is None else _summary(row, directory, row[ROW_FIELDS.index("metrics")])


# What a survey holds of an epoch directory, in this order: the fields of a line of the
# list index (core/format/index.py), then whether its ckpt-info.json is upstream CANDLE's and
# why it cannot be summarised (None when it can; the other fields but the epoch are
# then None). The line the index holds for a directory becomes its row as it is,
# extended by those two: `list` builds no object per epoch, and an `EpochSummary` is
# built from a row only for those who ask (`TreeSurvey.epochs`).
ROW_FIELDS = (*FIELDS, "legacy", "problem")
_INDEXED = (False, None)  # legacy and problem of an epoch the index describes
# The checksum of an `EpochSummary`, by whether any file has a recorded CRC32.
CHECKSUM_STATES = {True: "not verified", False: "off", None: None}


def _summary(row: list[Any], directory: str, metrics: dict[str, Any] | None) -> EpochSummary:
    """The `EpochSummary` of a survey's `row` of the epoch in `directory`, its metrics
    `metrics` (decoded: a row from the index holds their text)."""
    epoch, _, timestamp, metric, best, value, size, checksummed, _, version, legacy, problem = row
    return EpochSummary(
        epoch,
        directory,
        timestamp,
        metric,
        best,
        size,
        CHECKSUM_STATES[checksummed],
        legacy,
        problem,
        metrics,
        version,
        value,
    )


def _problem_row(epoch: int, problem: str) -> list[Any]:
    return [epoch, *[None] * (len(ROW_FIELDS) - 2), problem]


def _summarise(epoch: int, directory: str) -> list[Any] | None:
    """The row (ROW_FIELDS) of one epoch directory from its ckpt-info.json head (never
    raises for a bad file; its inode None: only an index line names one); None when the
    directory is gone (pruned since it was listed: not a problem of the tree)."""
    try:
        # Concatenated, not os.path.join: this runs once per epoch, 10 000 times a list.
        head = _HEAD_READER.read(directory + _SEP_INFO_FILE)
    except FileNotFoundError:
        if not os.path.lexists(directory):
            return None
        return _problem_row(epoch, f"no {INFO_FILE} (not a complete epoch)")
    except (OSError, ValueError) as error:
        return _problem_row(epoch, f"{INFO_FILE} unreadable: {error}")
    except RecursionError:
        return _problem_row(epoch, f"{INFO_FILE} unreadable: nested too deeply to parse")
    try:
        if head["epoch"] != epoch:
            return _problem_row(
                epoch,
                f"{INFO_FILE} records epoch {head['epoch']!r}; expected {epoch}, its directory's",
            )
        # The head's keys directly, not `checkpoint_info`: building the full record
        # costs as much again as reading the file, 10 000 or 100 000 times a list.
        legacy = is_legacy(head)
        size, checksummed = size_and_checksummed(head)
        if size is None:  # upstream CANDLE records no sizes
            try:
                size = _bytes_in(directory)
            except FileNotFoundError:
                return None  # pruned since its ckpt-info.json was read
        metrics = head.get("metrics")
        if type(metrics) is not dict:
            metrics = None
        metric = head["save_best_metric"]
        return [
            epoch,
            None,
            head["timestamp"],
            metric,
            finite_or_none(head["best_metric_last"]),
            None if metrics is None or metric is None else metrics.get(metric),
            size,
            checksummed,
            metrics,
            None if legacy else head.get("format_version"),
            legacy,
            None,
        ]
    except KeyError as error:
        problem = f"{INFO_FILE} has no key {error}"
    except (TypeError, ValueError, AttributeError) as error:
        problem = f"{INFO_FILE} has a value of the wrong type ({error})"
    return _problem_row(epoch, f"{problem}; 'candle-ckpt info {epoch}' shows the details")


def _bytes_in(directory: str) -> int:
    """The bytes of the regular files in `directory`, except ckpt-info.json."""
    with os.scandir(directory) as entries:
        return sum(
            entry.stat().st_size
            for entry in entries
            if entry.name != INFO_FILE and entry.is_file(follow_symlinks=False)
        )


class TreeSurvey:
    """Everything `survey` found in one tree: a row (ROW_FIELDS) of every epoch
    directory, in numeric order; where the links point; whether `work/` is there; the
    entries of `trash/`."""

    __slots__ = ("_epochs", "layout", "links", "rows", "trash", "work")

    def __init__(
        self,
        layout: CheckpointLayout,
        rows: list[list[Any]],
        links: dict[str, LinkState],
        work: bool,
        trash: list[str],
    ) -> None:
        self.layout = layout
        self.rows = rows
        self.links = links
        self.work = work
        self.trash = trash
        self._epochs: list[EpochSummary] | None = None

    def column(self, name: str) -> list[Any]:
        """Field `name` (ROW_FIELDS) of every row, in order."""
        return list(map(itemgetter(ROW_FIELDS.index(name)), self.rows))

    @property
    def epochs(self) -> list[EpochSummary]:
        """The `EpochSummary` of every row, in order (built on first use)."""
        if self._epochs is None:
            prefix = self.layout.epochs + os.sep  # the directory of an epoch, as `epoch_dir`
            self._epochs = [
                _summary(row, prefix + epoch_dirname(row[0]), metrics)
                for row, metrics in zip(self.rows, decoded_metrics(self.column("metrics")))
            ]
        return self._epochs

    @property
    def abandoned(self) -> list[int]:
        """The epochs after `last`: a timeline a rollback left behind (empty without `last`)."""
        last = self.links["last"].epoch
        return [] if last is None else [epoch for epoch in self.column("epoch") if epoch > last]


def survey(layout: CheckpointLayout, use_index: bool = True) -> TreeSurvey:
    """Survey the tree of `layout` (see the module docstring); reads no model file.

    With `use_index`, an epoch directory that `ckpts/index.jsonl` describes (its line
    names the directory's inode) is summarised from that line, and only the others
    from their ckpt-info.json (core/format/index.py); without, every one from its file.
    """
    try:
        trash = sorted(os.listdir(layout.trash))
    except FileNotFoundError:
        trash = []
    return TreeSurvey(
        layout,
        _rows(layout, use_index),
        {name: link_state(layout, name) for name in LINK_NAMES},
        os.path.lexists(layout.work),
        trash,
    )


def _rows(layout: CheckpointLayout, use_index: bool) -> list[list[Any]]:
    """The row (ROW_FIELDS) of every epoch directory, in numeric order."""
    try:
        with os.scandir(layout.epochs) as entries:
            # the inode comes with the entry (readdir's d_ino): no stat per epoch
            found = [(entry.name, entry.inode()) for entry in entries]
    except FileNotFoundError:
        return []
    index = read_index(layout.ckpts, len(found)) if use_index else {}
    prefix = layout.epochs + os.sep  # the directory of an epoch, as `epoch_dir` makes it
    rows: list[list[Any]] = []
    append = rows.append
    for name, inode in found:
        line = index.get(inode)
        # the line's epoch must be the directory's (a renamed directory keeps its inode)
        if line is not None and epoch_dirname(line[0]) == name:
            line += _INDEXED
            append(line)
        else:
            epoch = parse_epoch_dirname(name)
            row = None if epoch is None else _summarise(epoch, prefix + name)
            if row is not None:  # None: pruned since the scan, left out
                append(row)
    rows.sort(key=itemgetter(0))
    return rows


def describe_epochs(epochs: Iterable[int]) -> str:
    """Epoch numbers for a person, runs collapsed: [1, 2, 3, 5] -> "1-3, 5"."""
    runs: list[list[int]] = []
    for epoch in sorted(epochs):
        if runs and epoch == runs[-1][1] + 1:
            runs[-1][1] = epoch
        else:
            runs.append([epoch, epoch])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"
