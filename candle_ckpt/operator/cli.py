"""candle-ckpt: inspect, verify, roll back and prune a checkpoint tree from the shell.

Installed as the `candle-ckpt` console script, also run as `python -m candle_ckpt`.
Built on the framework-free core only: it never imports TensorFlow or Keras, so it
starts in a fraction of a second on a login node. DIR is a `ckpt_directory` (default
./save); EPOCH is a number, `last` or `best`::

    candle-ckpt list [DIR] [--metric NAME] [--json] [--verify]
    candle-ckpt info [DIR] [EPOCH]                  (default: last)
    candle-ckpt verify [DIR] [EPOCH | --all]        (default: last)
    candle-ckpt rollback [DIR] EPOCH [--dry-run]
    candle-ckpt prune [DIR] (--keep N [--mode linear|exponential] | --abandoned) [--dry-run]
    candle-ckpt export [DIR] [EPOCH] --to PATH [--force]   (default: last)
    candle-ckpt history [DIR] [--json | --csv] [--live]
    candle-ckpt plot [DIR] [--metric NAME ...] [--out FILE.png|.svg]

A single positional argument is an EPOCH if it is a number, `last` or `best`, else the
DIR (write ./5 for a directory named 5).

Exit status: 0 success; 1 a file listed in ckpt-info.json is missing or fails its
size or CRC32 check (verify, list --verify, rollback, export); 2 a usage error, a DIR
that is not a checkpoint tree, a missing epoch, a dangling or invalid link, an invalid
ckpt-info.json, or a change refused because a training job holds the tree's lock
(rollback, prune); 3 the epoch named by number was pruned or moved away by the job
writing the tree while it was read (not damage); 130 interrupted (Ctrl-C). Errors are
one line on stderr, never a traceback.

The read-only commands run beside a job that saves, repoints `last`/`best` and prunes:
an epoch that goes away while it is read is not reported as damage (core/restore/verify.py
tells the two apart). `list --verify` marks it `pruned meanwhile`, `verify --all` says
so on its line, neither counting it in the exit status; `last` or `best` is resolved
once, its epoch read, and resolved and read again if that epoch went away meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Iterator, Sequence

from ..core.errors import (
    CheckpointError,
    CorruptCheckpointError,
    EpochVanishedError,
    NoCheckpointError,
)
from ..core.format.layout import DEFAULT_CKPT_DIRECTORY, STEP_LINK
from ..core.format.steps import survey_steps
from ..core.storage import tree_fs
from ..core.text import printable
from .inventory import (
    CHECKSUM_STATES,
    describe_epochs,
    link_state,
    open_tree,
    require_epoch_dir,
    summarise_epoch,
    survey,
)

TYPE_CHECKING = False  # typing's, without importing typing: see core/format/info_keys.py
# The history, validation and CRC32 modules are imported by the commands that use them:
# the command line's start-up imports no more than `list` runs.
if TYPE_CHECKING:
    from typing import IO, Any, NoReturn, TypeVar

    from ..core.format.layout import CheckpointLayout
    from ..core.format.timelines import EpochRecord, History
    from ..core.restore.verify import FileCheck
    from .inventory import EpochSummary, TreeSurvey

    _T = TypeVar("_T")

EXIT_OK, EXIT_CORRUPT, EXIT_ERROR, EXIT_VANISHED = 0, 1, 2, 3
PRUNED_MEANWHILE = "pruned meanwhile"
# How many times an epoch `last` or `best` names is read when each one read goes away
# meanwhile: a job repoints them at every save.
LINK_ATTEMPTS = 5
PROG = "candle-ckpt"

LINK_SELECTORS = ("last", "best")
NO_METRICS = "none (files older than format 2 record no per-epoch metrics)"
# A JSON list of numbers spread over lines by indenting; a newline cannot be inside a
# JSON string, so this never matches string content.
_NUMBER_LIST = re.compile(r"\[\n[-+0-9.eE,\s]*\n\s*\]")


class UsageError(Exception):
    """The command line is wrong: reported on one line, exit status 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help formatter, set up only when it formats something.

    argparse makes a formatter for every argument it adds (to check its metavar, which
    needs no setting up), and setting one up reads the terminal's width through shutil,
    whose import (bz2, lzma) every run of `list` would pay for help it does not print.
    """

    def __init__(self, prog: str) -> None:
        self._deferred_prog = prog

    def __getattr__(self, name: str) -> Any:
        # An attribute not set: set them all up, once (popped, so that an attribute the
        # setting up does not set is an AttributeError, not a loop).
        prog = self.__dict__.pop("_deferred_prog", None)
        if prog is None:
            raise AttributeError(name)
        super().__init__(prog)
        return getattr(self, name)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)  # subparsers too
        super().__init__(*args, **kwargs)

    # argparse would print the usage too, and exit itself
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- arguments --------------------------------------------------------------------


def _is_selector(text: str) -> bool:
    return text in LINK_SELECTORS or (text.isascii() and text.isdigit())


def _split_positionals(
    values: Sequence[str], command: str, epoch_required: bool = False
) -> tuple[str, str]:
    """(DIR, EPOCH) from `[DIR] [EPOCH]`, EPOCH "last" if not given.

    See the module docstring for how a single argument is read.
    """
    if len(values) > 2:
        raise UsageError(
            f"{command}: expected at most DIR and EPOCH, received {' '.join(values)!r}"
        )
    if len(values) == 2:
        directory, epoch = values
    elif len(values) == 1 and _is_selector(values[0]):
        directory, epoch = DEFAULT_CKPT_DIRECTORY, values[0]
    else:
        directory, epoch = (values or [DEFAULT_CKPT_DIRECTORY])[0], None
    if epoch is None:
        if epoch_required:
            raise UsageError(f"{command}: expected an EPOCH to roll back to")
        epoch = "last"
    if not _is_selector(epoch):
        raise UsageError(f"{command}: EPOCH is {epoch!r}; expected a number, 'last' or 'best'")
    return directory, epoch


def _select_epoch(layout: CheckpointLayout, selector: str) -> int:
    """The epoch a selector names: a number (its directory must exist), last or best."""
    if selector not in LINK_SELECTORS:
        require_epoch_dir(layout, int(selector))
        return int(selector)
    state = link_state(layout, selector)
    if state.problem is not None:
        raise CheckpointError(state.problem)
    if state.epoch is None:
        raise NoCheckpointError(
            f"'{layout.link(selector)}' does not exist; expected a "
            f"link to an epoch (or give an EPOCH number)"
        )
    return state.epoch


def _read_selected(
    layout: CheckpointLayout, selector: str, read: Callable[[int], _T]
) -> tuple[int, _T]:
    """(epoch, read(epoch)) for the epoch `selector` names.

    `last` and `best` are resolved once per attempt and only that epoch is read; if it
    went away meanwhile (`EpochVanishedError`: the job repointed the link and pruned
    the epoch), the link is resolved and read again, LINK_ATTEMPTS times at most. An
    epoch named by number is read once: its going away is the error.
    """
    for _ in range(LINK_ATTEMPTS - 1 if selector in LINK_SELECTORS else 0):
        epoch = _select_epoch(layout, selector)
        with contextlib.suppress(EpochVanishedError):
            return epoch, read(epoch)
    epoch = _select_epoch(layout, selector)
    return epoch, read(epoch)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of `candle-ckpt`: with every subcommand, or only `command`.

    `main` builds only the command its command line names: the other subparsers are
    most of the parser's construction, paid by every run of `list`.
    """
    parser = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=f"DIR is a ckpt_directory (default {DEFAULT_CKPT_DIRECTORY}); EPOCH is a "
        "number, last or best (a lone number, last or best is the EPOCH: write ./5 for a "
        "directory named 5). "
        "Exit status: 0 ok; 1 a file an epoch lists is missing or fails its CRC32 (verify, "
        "list --verify, rollback, export); 2 a usage error, a DIR that is not a tree, a "
        "missing epoch, a bad link or ckpt-info.json, or a training job holding the tree's "
        "lock (rollback, prune); 3 an epoch named by number was pruned while it was read "
        "(not damage); 130 interrupted. Errors are one line on stderr.",
    )
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_Parser,
        metavar="{list,info,verify,rollback,prune,history,plot,export}",
        # given, not derived: deriving it formats a usage line, which imports shutil
        prog=PROG,
    )
    for name, add_command in _SUBCOMMANDS.items():
        if command is None or command == name:
            add_command(commands)
    return parser


_TREE_THEN_EPOCH = f"[DIR] (default {DEFAULT_CKPT_DIRECTORY}), then EPOCH: a number, last or best"
_DIR = f"a ckpt_directory (default {DEFAULT_CKPT_DIRECTORY})"
_LOCK_REFUSAL = (
    "while a training job holds the tree's lock, ckpts/.lock (exit 2, naming the job's "
    "pid, host and start time): run it between jobs"
)


def _add_list(commands: argparse._SubParsersAction[_Parser]) -> None:
    list_parser = commands.add_parser(
        "list",
        help="one row per epoch: size, time, metric, checksum, last/best marks",
        description="One row per epoch in numeric order: size, time saved, its own value "
        "of the tracked metric (or NAME) and the best value so far; marks last, best, the "
        "epochs after last (abandoned by a rollback) and leftover work/ and trash/. Reads "
        "no model file unless --verify, which exits 1 when an epoch is BAD. Exit 2 when "
        "DIR is not a checkpoint tree.",
    )
    list_parser.add_argument(
        "where",
        nargs="?",
        default=DEFAULT_CKPT_DIRECTORY,
        metavar="DIR",
        help=_DIR,
    )
    list_parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    list_parser.add_argument(
        "--metric",
        metavar="NAME",
        help="show each epoch's own value of NAME (default: the "
        "tracked metric, ckpt_save_best_metric)",
    )
    list_parser.add_argument(
        "--verify",
        action="store_true",
        help="also validate every ckpt-info.json and compute every "
        "CRC32 (reads every model file, as verify --all)",
    )


def _add_info(commands: argparse._SubParsersAction[_Parser]) -> None:
    info_parser = commands.add_parser(
        "info",
        help="the ckpt-info.json of an epoch, validated",
        description="Print an epoch's ckpt-info.json (default: the one last names), "
        "validated against its schema. Exit 2 for a missing epoch, a dangling or invalid "
        "link, or an invalid ckpt-info.json (naming the key).",
    )
    info_parser.add_argument(
        "where", nargs="*", metavar="ARG", help=_TREE_THEN_EPOCH + " (default last)"
    )


def _add_verify(commands: argparse._SubParsersAction[_Parser]) -> None:
    verify_parser = commands.add_parser(
        "verify",
        help="recompute the CRC32 of every file an epoch lists",
        description="Recompute the size and CRC32 of every file an epoch's "
        "ckpt-info.json lists (default: the epoch last names; --all: every epoch) and "
        "print each mismatch with the file, the expected and the actual value. A progress "
        "bar on a terminal only. Exit 0 all good, 1 a mismatch or a missing file, 2 a "
        "usage or format error.",
    )
    verify_parser.add_argument(
        "where", nargs="*", metavar="ARG", help=_TREE_THEN_EPOCH + " (default last)"
    )
    verify_parser.add_argument(
        "--all", action="store_true", help="verify every epoch (takes no EPOCH)"
    )


def _add_rollback(commands: argparse._SubParsersAction[_Parser]) -> None:
    rollback_parser = commands.add_parser(
        "rollback",
        help="verify EPOCH, then point last at it and best at the best before it",
        description="Verify EPOCH (every CRC32), then point best at the best epoch at or "
        "before it (its recorded epoch_best) and last at EPOCH: relative links, each "
        "replaced atomically, logged to ckpt.log; last_step is removed. The next run "
        "resumes from the end of EPOCH; the epochs after it, and the step checkpoints, "
        "stay on disk as abandoned (prune --abandoned deletes them). "
        "Refused, changing nothing: an EPOCH that does not verify (exit 1); " + _LOCK_REFUSAL + ".",
    )
    rollback_parser.add_argument(
        "where",
        nargs="*",
        metavar="ARG",
        help=f"[DIR] (default {DEFAULT_CKPT_DIRECTORY}), then EPOCH: an epoch number "
        "(required; last and best are refused: name the epoch)",
    )
    rollback_parser.add_argument(
        "--dry-run", action="store_true", help="print what would change, change nothing"
    )


def _add_prune(commands: argparse._SubParsersAction[_Parser]) -> None:
    prune_parser = commands.add_parser(
        "prune",
        help="delete epochs by keep policy or after last; never last or best",
        description="Delete epochs, never the ones last and best name: --keep N applies "
        "a keep policy to the epochs up to last, across runs; --abandoned deletes the "
        "epochs after last (a timeline a rollback left) and the step checkpoints no "
        "restart resumes (superseded, or unlinked by a rollback). Each epoch is renamed into "
        "ckpts/trash/ before it is removed, so a kill never leaves half of one in "
        "epochs/; logged to ckpt.log. Refused, deleting nothing: while last or best is "
        "dangling or invalid (exit 2; repair it with rollback first); --abandoned without "
        "a last link (exit 2); " + _LOCK_REFUSAL + ".",
    )
    prune_parser.add_argument(
        "where", nargs="?", default=DEFAULT_CKPT_DIRECTORY, metavar="DIR", help=_DIR
    )
    how = prune_parser.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--keep",
        type=int,
        metavar="N",
        help="keep at most N epochs up to last (plus last and best)",
    )
    how.add_argument(
        "--abandoned",
        action="store_true",
        help="delete the epochs after last (a timeline a rollback left) and the step "
        "checkpoints no restart resumes",
    )
    prune_parser.add_argument(
        "--mode",
        choices=("linear", "exponential"),
        help="with --keep: the N newest (linear, the default), or spread exponentially",
    )
    prune_parser.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted, delete nothing"
    )


def _add_history(commands: argparse._SubParsersAction[_Parser]) -> None:
    history_parser = commands.add_parser(
        "history",
        help="every completed epoch of every run, from ckpts/history.jsonl",
        description="Every completed epoch of every run, saved or not, from "
        "ckpts/history.jsonl: metrics, training and save seconds, last and best, the "
        "epochs a restart or rollback abandoned and those after last. A damaged history "
        "is read past the damage with a warning on stderr. The first read leaves "
        "ckpts/history.cache (checked by CRC32, safe to delete); later reads parse only "
        "the lines appended since. Exit 2 when DIR is not a checkpoint tree.",
    )
    history_parser.add_argument(
        "where", nargs="?", default=DEFAULT_CKPT_DIRECTORY, metavar="DIR", help=_DIR
    )
    output = history_parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON for scripts")
    output.add_argument("--csv", action="store_true", help="print CSV (one row per epoch)")
    history_parser.add_argument(
        "--live",
        action="store_true",
        help="only the live timeline up to last (no abandoned epochs)",
    )


def _add_plot(commands: argparse._SubParsersAction[_Parser]) -> None:
    plot_parser = commands.add_parser(
        "plot",
        help="metric curves over epochs, last, best, saved epochs and rollbacks "
        "marked: a picture with --out (needs matplotlib), else a text chart",
        description="Metric curves over epochs from ckpts/history.jsonl: the live "
        "timeline and the abandoned ones, with saved epochs, last, best and the epochs a "
        "restart or rollback went back to marked. A text chart on the terminal; a picture "
        "with --out. A metric no epoch recorded is an error listing those recorded "
        "(exit 2).",
    )
    plot_parser.add_argument(
        "where", nargs="?", default=DEFAULT_CKPT_DIRECTORY, metavar="DIR", help=_DIR
    )
    plot_parser.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help="a metric to draw (repeatable; default: the tracked "
        "metric, else the first one recorded)",
    )
    plot_parser.add_argument(
        "--out",
        metavar="FILE",
        help="write a picture (.png or .svg; needs matplotlib, pip install 'candle_ckpt[plot]')",
    )


def _add_export(commands: argparse._SubParsersAction[_Parser]) -> None:
    export_parser = commands.add_parser(
        "export",
        help="verify EPOCH, then write its weights for plain Keras "
        "(load_weights) or PyTorch (load_state_dict), with PATH.sha256",
        description="Verify EPOCH (default: the epoch last names), then write its model "
        "weights, no optimizer state: a Keras tree as Keras 3's .weights.h5 (for "
        "model.load_weights on a model built as the one trained), a PyTorch tree as the "
        "state dict registered as 'model' (for net.load_state_dict(torch.load(PATH, "
        "weights_only=True))). PATH is written under a temporary name, fsynced and "
        "renamed; its SHA-256 goes to PATH.sha256 (sha256sum format). Refused: an epoch "
        "that does not verify (exit 1); an existing PATH without --force, a Keras PATH "
        "not ending in .weights.h5, a subclassed Keras model (exit 2).",
    )
    export_parser.add_argument(
        "where", nargs="*", metavar="ARG", help=_TREE_THEN_EPOCH + " (default last)"
    )
    export_parser.add_argument(
        "--to",
        required=True,
        metavar="PATH",
        help="the file to write: NAME.weights.h5 for Keras, e.g. NAME.pt for PyTorch",
    )
    export_parser.add_argument("--force", action="store_true", help="replace PATH if it exists")


# In the order `candle-ckpt --help` lists them.
_SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction[_Parser]], None]] = {
    "list": _add_list,
    "info": _add_info,
    "verify": _add_verify,
    "rollback": _add_rollback,
    "prune": _add_prune,
    "history": _add_history,
    "plot": _add_plot,
    "export": _add_export,
}


# -- output -----------------------------------------------------------------------


def _count(number: int, noun: str) -> str:
    """ "1 file", "2 files"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _human_size(size: int | None) -> str:
    """Bytes for a person, in decimal units as the save log's MB/s: "2.0 MB"."""
    if size is None:
        return "-"
    units, value = ["B", "kB", "MB", "GB", "TB"], float(size)
    while value >= 1000 and len(units) > 1:
        value /= 1000
        units.pop(0)
    return f"{size} B" if units[0] == "B" else f"{value:.1f} {units[0]}"


class _ProgressBar:
    """A one-line progress bar on a terminal (stderr) while CRC32s are computed."""

    WIDTH = 30

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.shown = False

    def __call__(self, path: str, done: int, total: int) -> None:
        filled = self.WIDTH * done // max(total, 1)
        self.stream.write(
            f"\r{os.path.basename(path)} [{'#' * filled:<{self.WIDTH}}] "
            f"{_human_size(done)} / {_human_size(total)}"
        )
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * (self.WIDTH + 60) + "\r")
            self.stream.flush()
            self.shown = False


@contextlib.contextmanager
def _progress() -> Iterator[_ProgressBar | None]:
    """A `_ProgressBar` when stderr is a terminal, else None (no output); erased at the end."""
    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.clear()


def _check_state(layout: CheckpointLayout, epoch: int, progress: _ProgressBar | None) -> str:
    """The checksum column of `list --verify`: ok, off, or what is wrong.

    The ckpt-info.json is read whole and validated first, as `verify` does, so that no
    file name from an unvalidated file is ever opened.
    """
    from ..core.restore.verify import check_epoch

    try:
        check = check_epoch(layout, epoch, progress=progress)
    except EpochVanishedError:
        return PRUNED_MEANWHILE
    except CheckpointError:
        return "BAD: invalid ckpt-info.json"
    if check.bad:
        return "BAD: " + ", ".join(sorted({str(bad.problem) for bad in check.bad}))
    return "ok" if check.all_checksummed else "off"


def _shown_metric(tree: TreeSurvey, requested: str | None) -> str | None:
    """The metric whose own value `list` shows: `requested`, else the tracked one.

    Raises:
        CheckpointError: `requested` is recorded by no epoch (naming those that are).
    """
    if requested is None:
        # the newest epoch's: the one an operator looks at first
        metrics, problems = tree.column("save_best_metric"), tree.column("problem")
        return next(
            (
                m
                for m, problem in zip(reversed(metrics), reversed(problems))
                if problem is None and m
            ),
            None,
        )
    recorded = sorted({name for s in tree.epochs if s.metrics for name in s.metrics})
    if requested not in recorded:
        names = ", ".join(recorded) or NO_METRICS
        raise CheckpointError(
            f"--metric {requested!r}: no epoch of '{tree.layout.root}' "
            f"records it; recorded: {names}"
        )
    return requested


def _checksums(tree: TreeSurvey, verify: bool) -> list[str | None]:
    """The checksum column: each summary's, or with `verify` each epoch's check."""
    if not verify:
        return list(map(CHECKSUM_STATES.__getitem__, tree.column("checksummed")))
    states: list[str | None] = []
    for epoch in tree.column("epoch"):
        # an epoch whose summary failed too: its check says BAD (exit status 1)
        with _progress() as progress:
            states.append(_check_state(tree.layout, epoch, progress))
    return states


def _own_value(summary: EpochSummary, metric: str | None) -> Any:
    """The epoch's own value of `metric` (None when not recorded)."""
    if metric == summary.metric:  # its metrics are decoded only for another metric
        return summary.metric_value
    metrics = summary.metrics
    return None if metrics is None or metric is None else metrics.get(metric)


def _rows(
    tree: TreeSurvey, checksums: list[str | None], metric: str | None
) -> list[dict[str, Any]]:
    """One dict per epoch, as `list --json` prints it; `value` is the epoch's own value
    of `metric` (None when not recorded)."""
    abandoned = set(tree.abandoned)
    last, best = tree.links["last"].epoch, tree.links["best"].epoch
    return [
        {
            "epoch": summary.epoch,
            "size": summary.size,
            "timestamp": summary.timestamp,
            "metric": summary.metric,
            "best_metric_last": summary.best_value,
            "value_of": metric,
            "value": _own_value(summary, metric),
            "metrics": summary.metrics,
            "format_version": summary.format_version,
            "checksum": checksum,
            "legacy": summary.legacy,
            "last": last == summary.epoch,
            "best": best == summary.epoch,
            "abandoned": summary.epoch in abandoned,
            "problem": summary.problem,
        }
        for summary, checksum in zip(tree.epochs, checksums)
    ]


def _notes(tree: TreeSurvey) -> list[str]:
    """Lines after the table: abandoned epochs, leftovers."""
    notes = []
    abandoned = tree.abandoned
    if abandoned:
        notes.append(
            f"abandoned: epochs {describe_epochs(abandoned)} lie after last "
            f"(a rollback left them; the next run overwrites them, "
            f"'{PROG} prune --abandoned' deletes them)"
        )
    if tree.work:
        notes.append(
            "leftover: ckpts/work/ (a save in progress, or one interrupted: "
            "the next save removes it)"
        )
    if tree.trash:
        deletions = _count(len(tree.trash), "interrupted deletion")
        notes.append(f"leftover: ckpts/trash/ holds {deletions} (the next run finishes it)")
    return notes


# The flags column of `list` for (last, best, abandoned), each 0 or 1.
_LIST_FLAGS = {
    (last, best, abandoned): " ".join(
        name for name, on in (("last", last), ("best", best), ("abandoned", abandoned)) if on
    )
    for last in (0, 1)
    for best in (0, 1)
    for abandoned in (0, 1)
}


def _table(tree: TreeSurvey, checksums: list[str | None], metric: str | None) -> list[str]:
    """The lines of the `list` table: aligned columns, the metrics named in the header.

    The epoch's own value of `metric` ("-" where not recorded: files older than format
    2), then the best value so far of the tracked metric.
    """
    metrics, problems = tree.column("save_best_metric"), tree.column("problem")
    tracked = {m for m, problem in zip(metrics, problems) if problem is None}
    one_metric = len(tracked) == 1 and None not in tracked
    # Column by column: a field of every epoch by `TreeSurvey.column`, the cell formats
    # written out (metrics "%.6g", "-" for none): a call per cell would be most of the
    # run of `list` on 10 000 epochs.
    epochs = tree.column("epoch")
    # Most epochs of a run have the same size: each size is formatted once.
    sizes = tree.column("size")
    size_texts = {size: _human_size(size) for size in set(sizes)}
    if tracked == {metric} and metric is not None:
        # every epoch tracks the metric shown, whose value has a field of its own
        own_values = tree.column("metric_value")
    else:
        own_values = [_own_value(s, metric) for s in tree.epochs]
    values = ["-" if value is None else f"{value:.6g}" for value in own_values]
    # The best value so far changes only when an epoch improves on it: each is
    # formatted once.
    best_values = tree.column("best_metric_last")
    best_texts = {value: "-" if value is None else f"{value:.6g}" for value in set(best_values)}
    bests = list(map(best_texts.__getitem__, best_values))
    if not one_metric:
        bests = [text if m is None else f"{m}={text}" for m, text in zip(metrics, bests)]
    columns: list[list[str]] = [
        ["epoch", *map(str, epochs)],
        ["size", *map(size_texts.__getitem__, sizes)],
        ["saved at", *map(str, tree.column("timestamp"))],
        [metric or "metric", *values],
        [f"best {next(iter(tracked))}" if one_metric else "best metric", *bests],
        ["checksum", *map(str, checksums)],
        ["", *_flags(epochs, tree.links["last"].epoch, tree.links["best"].epoch)],
    ]
    for row, problem in enumerate(problems, 1):
        if problem is not None:
            for column in columns[1:5]:
                column[row] = "-"
            # BAD when --verify checked it (and found it so): exit status 1
            bad = str(checksums[row - 1]).startswith("BAD")
            columns[5][row] = ("BAD: " if bad else "INVALID: ") + problem
    return _aligned(columns, right=(0, 1, 3, 4))


def _flags(epochs: list[int], last: int | None, best: int | None) -> list[str]:
    """The flags column of `list` for `epochs` (ascending): last, best, abandoned.

    Only last, best and the epochs after last have any: their rows are found by
    bisection, and every other row is "".
    """
    # epochs after last are abandoned (TreeSurvey.abandoned); none without last
    after = float("inf") if last is None else last
    flags = [""] * len(epochs)
    marked = {bisect_left(epochs, epoch) for epoch in (last, best) if epoch is not None}
    marked.update(range(bisect_right(epochs, after), len(epochs)))
    for row in marked:
        if row < len(epochs):
            epoch = epochs[row]
            flags[row] = _LIST_FLAGS[epoch == last, epoch == best, epoch > after]
    return flags


def _aligned(columns: list[list[str]], right: Collection[int] = ()) -> list[str]:
    """Columns of cells (each a list, header first) as text lines; the columns in
    `right` are right-aligned."""
    widths = [max(map(len, column)) for column in columns]
    # One %-format for every row, applied row by row in C: `history` aligns 100 000 rows.
    row = "  ".join(
        ("%%%ds" if index in right else "%%-%ds") % width for index, width in enumerate(widths)
    )
    return list(map(str.rstrip, map(row.__mod__, zip(*columns))))


# -- commands ---------------------------------------------------------------------


def _open_tree(directory: str, *, writing: bool = False) -> CheckpointLayout:
    """`inventory.open_tree`, then each path a writer of the tree refuses (a planted
    link: core/storage/tree_fs.py): for a command `writing` the tree, refused before it reads
    anything (UnsafePathError); else a warning on stderr, and the command goes on
    reading what it safely can."""
    layout = open_tree(directory)
    if writing:
        tree_fs.refuse_unsafe_tree(layout)
    for problem in tree_fs.check_tree(layout):
        print(f"{PROG}: warning: {problem}; {_REFUSED}", file=sys.stderr)
    return layout


_REFUSED = "a job, rollback and prune refuse this tree until it is removed"


def cmd_list(args: argparse.Namespace) -> int:
    """Print the table (or JSON) of every epoch; reads no model file unless --verify."""
    _no_cycle_collection()
    tree = survey(_open_tree(args.where))
    steps = survey_steps(tree.layout)
    metric = _shown_metric(tree, args.metric)
    checksums = _checksums(tree, args.verify)
    # like `verify`: a bad epoch found by --verify is exit status 1, for scripts
    status = (
        EXIT_CORRUPT
        if args.verify and any(str(state).startswith("BAD") for state in checksums)
        else EXIT_OK
    )
    if args.json:
        print(
            json.dumps(
                {
                    "directory": tree.layout.root,
                    "links": {name: state.as_dict() for name, state in tree.links.items()},
                    "abandoned": tree.abandoned,
                    "work": tree.work,
                    "trash": tree.trash,
                    "epochs": _rows(tree, checksums, metric),
                    "steps": [state.as_dict() for state in steps],
                },
                indent=1,
            )
        )
        return status
    lines = [tree.layout.root, "   ".join(state.describe() for state in tree.links.values())]
    lines += _table(tree, checksums, metric) if tree.rows else ["no epochs saved"]
    lines += [state.describe(tree.layout.ckpts) for state in steps]
    lines += _notes(tree)
    lines.append("")
    sys.stdout.write("\n".join(map(printable, lines)))
    return status


def cmd_info(args: argparse.Namespace) -> int:
    """Print the validated ckpt-info.json of one epoch."""
    from ..core.restore.resume import read_epoch_info

    directory, selector = _split_positionals(args.where, "info")
    layout = _open_tree(directory)
    _, info = _read_selected(layout, selector, lambda epoch: read_epoch_info(layout, epoch))
    text = json.dumps(info, indent=1)
    # a format 1 epochs_saved names every epoch of the run: one line, not 10 000
    print(_NUMBER_LIST.sub(lambda match: json.dumps(json.loads(match.group())), text))
    return EXIT_OK


def _verify_epoch(
    layout: CheckpointLayout, epoch: int, listed: bool = False, batch: int = 0
) -> int:
    """Verify one epoch (with `batch`: that step checkpoint), print the outcome;
    return its exit status.

    An invalid ckpt-info.json is an error (exit status 2) for an epoch named; for one
    `verify --all` `listed`, the epoch is CORRUPT (1) and the others are verified on.

    Raises:
        EpochVanishedError: the epoch went away while it was read (nothing printed).
    """
    from ..core.restore.verify import check_epoch

    name = f"epoch {epoch}"
    if batch:
        name = f"step {os.path.relpath(layout.step_dir(epoch, batch), layout.ckpts)}"
    try:
        with _progress() as progress:
            check = check_epoch(layout, epoch, progress=progress, batch=batch)
    except EpochVanishedError:
        raise
    except NoCheckpointError as error:
        print(f"{name}: MISSING: {error}")
        return EXIT_CORRUPT
    except CheckpointError as error:
        if listed:
            print(f"{name}: CORRUPT: {error}")
            return EXIT_CORRUPT
        print(f"{PROG}: error: {name}: {error}", file=sys.stderr)
        return EXIT_ERROR
    for bad in check.bad:
        print(f"{name}: {bad.describe()}")
    if check.bad:
        print(f"{name}: CORRUPT ({len(check.bad)} of {_count(len(check.files), 'file')})")
        return EXIT_CORRUPT
    print(f"{name}: {_verified(check.files)}")
    return EXIT_OK


def _verified(checks: Sequence[FileCheck]) -> str:
    """ "ok (...)" for intact files, saying how many were only size-checked."""
    unverified = sum(check.actual_crc32 is None for check in checks)
    if unverified:
        return (
            f"ok ({len(checks) - unverified} of {_count(len(checks), 'file')} "
            f"CRC32-verified, {unverified} without a recorded CRC32: size checked only)"
        )
    return f"ok ({_count(len(checks), 'file')} CRC32-verified)"


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify one epoch (default last) or every epoch; exit 0, 1 or 2."""
    if args.all:
        if len(args.where) > 1 or (args.where and _is_selector(args.where[0])):
            raise UsageError("verify: --all takes no EPOCH")
        layout = _open_tree((args.where or [DEFAULT_CKPT_DIRECTORY])[0])
        epochs, steps = layout.list_epochs(), layout.list_steps()
        if not epochs and not steps:
            raise NoCheckpointError(f"'{layout.epochs}' holds no epoch to verify")
        statuses = [_verify_listed(layout, epoch) for epoch in epochs]
        statuses += [_verify_listed(layout, *step) for step in steps]
        return max(statuses)
    directory, selector = _split_positionals(args.where, "verify")
    layout = _open_tree(directory)
    return _read_selected(layout, selector, lambda epoch: _verify_epoch(layout, epoch))[1]


def _verify_listed(layout: CheckpointLayout, epoch: int, batch: int = 0) -> int:
    """`_verify_epoch` of an epoch (or step checkpoint) `verify --all` listed; one
    pruned since is said so, exit status 0: it is not damage."""
    try:
        return _verify_epoch(layout, epoch, listed=True, batch=batch)
    except EpochVanishedError:
        print(
            f"epoch {epoch}: {PRUNED_MEANWHILE} (moved into trash/ by the job writing "
            f"the tree while it was read; not damage)"
        )
        return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    """Verify EPOCH, then point best and last (atomically, relative links)."""
    # Imported here: admin and logs bring in the save protocol and logging, imports
    # that only the two commands that change the tree need (benchmarks/bench_cli_list.py).
    from ..core.logs import tree_logger
    from .admin import apply_rollback, plan_rollback

    directory, selector = _split_positionals(args.where, "rollback", epoch_required=True)
    if not selector.isdigit():
        raise UsageError(f"rollback: EPOCH is {selector!r}; expected an epoch number")
    layout = _open_tree(directory, writing=not args.dry_run)
    before = {name: link_state(layout, name).describe() for name in ("last", "best")}
    step_link = layout.link(STEP_LINK)
    step_before = os.readlink(step_link) if os.path.islink(step_link) else None
    with _progress() as progress:
        plan = plan_rollback(layout, int(selector), progress=progress)
    print(f"epoch {plan.epoch}: {_verified(plan.checks)}")
    if not args.dry_run:
        apply_rollback(layout, plan, tree_logger("operator", layout, verbose=False))
    point, remove = ("would point", "would remove") if args.dry_run else ("pointed", "removed")
    print(f"{point} last -> {layout.relative_epoch_target(plan.epoch)} (was {before['last']})")
    best = "best" if plan.best is None else f"best -> {layout.relative_epoch_target(plan.best)}"
    print(
        f"{remove if plan.best is None else point} {best} (was {before['best']}): "
        f"{plan.best_reason}"
    )
    if step_before is not None:
        print(
            f"{remove} {STEP_LINK} (was -> {step_before}): the run resumes at the end of "
            f"epoch {plan.epoch}; '{PROG} prune --abandoned' deletes the step checkpoints"
        )
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete epochs by policy or after last, never last or best."""
    from ..core.logs import tree_logger
    from .admin import (  # see cmd_rollback
        apply_prune,
        apply_prune_steps,
        plan_abandoned,
        plan_abandoned_steps,
        plan_prune,
    )

    layout = _open_tree(args.where, writing=not args.dry_run)
    if args.abandoned:
        if args.mode is not None:
            raise UsageError("prune: --mode applies to --keep, not to --abandoned")
        doomed, reason = plan_abandoned(layout), "--abandoned"
    else:
        if args.keep < 1:
            raise UsageError(f"prune: --keep is {args.keep}; expected an integer >= 1")
        mode = args.mode or "linear"
        doomed, reason = plan_prune(layout, args.keep, mode), f"--keep {args.keep} --mode {mode}"
    verb = "would delete" if args.dry_run else "deleted"
    if doomed and not args.dry_run:
        apply_prune(layout, doomed, reason, tree_logger("operator", layout, verbose=False))
    print(f"{verb} {_count(len(doomed), 'epoch')}: {describe_epochs(doomed)}")
    steps = plan_abandoned_steps(layout) if args.abandoned else []
    if steps:
        if not args.dry_run:
            apply_prune_steps(layout, steps, tree_logger("operator", layout, verbose=False))
        names = ", ".join(os.path.relpath(state.directory, layout.ckpts) for state in steps)
        print(f"{verb} {_count(len(steps), 'step checkpoint')} no restart resumes: {names}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Verify one epoch (default last), then export its weights (see operator/export.py)."""
    # Imported here: h5py (and torch for a PyTorch tree) load only for this command.
    from .export import export_epoch, print_exported

    directory, selector = _split_positionals(args.where, "export")
    layout = _open_tree(directory)
    epoch, exported = _read_selected(
        layout, selector, lambda epoch: export_epoch(layout, epoch, args.to, force=args.force)
    )
    print_exported(exported, epoch)
    return EXIT_OK


def _no_cycle_collection() -> None:
    """Turn off the cyclic garbage collector for the rest of this (short) process.

    A survey or a history makes a few dicts per epoch, hundreds of thousands of them,
    none in a reference cycle: the collector would only traverse them again and again.
    """
    gc.disable()


def _read_tree_history(directory: str) -> tuple[CheckpointLayout, History, int | None]:
    """(layout, History, last) of the tree in `directory`; damage is warned about on
    stderr. `last` is the epoch the history was read against, read before it: a job
    records an epoch in the history before it saves it, so the history holds `last`
    even while the job writes."""
    from ..core.format.history import read_history

    _no_cycle_collection()
    layout = _open_tree(directory)
    last = link_state(layout, "last").epoch
    history = read_history(layout.ckpts, last, cache=True)
    reported = tree_fs.check_tree(layout)
    for warning in history.warnings:
        if not any(warning.startswith(problem) for problem in reported):
            print(f"{PROG}: warning: {printable(warning)}", file=sys.stderr)
    return layout, history, last


def _history_rows(history: History, live_only: bool) -> list[EpochRecord]:
    return history.live if live_only else history.epochs


def _history_flags(record: EpochRecord, last: int | None, best: int | None) -> str:
    """The flags column of `history`: last, best, abandoned, after last."""
    return " ".join(
        flag
        for flag, on in (
            ("last", record.epoch == last and not record.abandoned),
            ("best", record.epoch == best and not record.abandoned),
            ("abandoned", record.abandoned),
            ("after last", record.after_last),
        )
        if on
    )


def cmd_history(args: argparse.Namespace) -> int:
    """Print every completed epoch the history recorded (table, --json or --csv)."""
    layout, history, last = _read_tree_history(args.where)
    records = _history_rows(history, args.live)
    names = history.metric_names
    best = link_state(layout, "best").epoch
    if args.json:
        print(
            json.dumps(
                {
                    "path": history.path,
                    "warnings": history.warnings,
                    "rewinds": history.rewinds,
                    "runs": [run._asdict() for run in history.runs],
                    "epochs": [
                        {
                            "epoch": r.epoch,
                            "run_id": r.run_id,
                            "time": r.time,
                            "metrics": r.metrics,
                            "train_seconds": r.train_seconds,
                            "saved": r.saved,
                            "save_seconds": r.save_seconds,
                            "abandoned": r.abandoned,
                            "after_last": r.after_last,
                        }
                        for r in records
                    ],
                }
            )
        )
        return EXIT_OK
    if args.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(
            [
                "epoch",
                "run_id",
                "time",
                *names,
                "train_seconds",
                "saved",
                "save_seconds",
                "abandoned",
            ]
        )
        writer.writerows(
            [
                r.epoch,
                r.run_id,
                r.time,
                *("" if r.metrics.get(n) is None else r.metrics[n] for n in names),
                "" if r.train_seconds is None else r.train_seconds,
                int(r.saved),
                "" if r.save_seconds is None else r.save_seconds,
                int(r.abandoned),
            ]
            for r in records
        )
        return EXIT_OK
    if not history.epochs:
        print(
            f"{history.path}: no epoch recorded (the file is absent: a tree written "
            f"before format 2, or no epoch has completed)"
        )
        return EXIT_OK
    marked = (last, best)
    # Comprehensions with the cell formats written out (metrics "%.6g", seconds "%.3f",
    # "-" for none, as `list`): a table of 100 000 epochs has a million cells.
    columns = [
        ["epoch", *[str(r.epoch) for r in records]],
        ["run", *[r.run_id[:8] for r in records]],
        ["finished (UTC)", *[str(r.time or "-") for r in records]],
        *(
            [
                name,
                *[
                    "-" if (value := r.metrics.get(name)) is None else f"{value:.6g}"
                    for r in records
                ],
            ]
            for name in names
        ),
        [
            "train s",
            *["-" if (seconds := r.train_seconds) is None else f"{seconds:.3f}" for r in records],
        ],
        [
            "save s",
            *[
                "-" if not r.saved or (seconds := r.save_seconds) is None else f"{seconds:.3f}"
                for r in records
            ],
        ],
        [
            "",
            *[
                _history_flags(r, last, best)
                if r.abandoned or r.after_last or r.epoch in marked
                else ""
                for r in records
            ],
        ],
    ]
    right = {0, *range(3, 3 + len(names) + 2)}
    out = [history.path, *_aligned(columns, right=right)]
    abandoned = sum(r.abandoned for r in history.epochs)
    after_last = sum(r.after_last for r in history.epochs)
    out.append(
        f"{_count(len(history.runs), 'run')}, {_count(len(history.live), 'epoch')} "
        f"on the live timeline, {abandoned} abandoned"
        + (f", {after_last} after last (the next run resumes from last)" if after_last else "")
        + (
            f" (runs resumed from epochs {describe_epochs(history.rewinds)})"
            if history.rewinds
            else ""
        )
    )
    sys.stdout.write("\n".join(map(printable, out)) + "\n")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw metric curves over epochs: a picture with --out, else a text chart."""
    from .plot import Marks, chosen_metrics, text_chart, write_picture

    layout, history, last = _read_tree_history(args.where)
    metrics = chosen_metrics(history, args.metric, _tracked_metric(layout, last))
    marks = Marks(
        last,
        link_state(layout, "best").epoch,
        [r.epoch for r in history.live if r.saved],
        history.rewinds,
    )
    if args.out:
        write_picture(history, metrics, marks, args.out)
        print(f"wrote {args.out}: {', '.join(metrics)} over {len(history.live)} epochs")
        return EXIT_OK
    lines = []
    for metric in metrics:
        lines += [*text_chart(history, metric, marks), ""]
    print("\n".join(map(printable, lines)).rstrip())
    return EXIT_OK


def _tracked_metric(layout: CheckpointLayout, last: int | None) -> str | None:
    """The metric the epoch `last` tracks; when that epoch was pruned meanwhile, the
    one the epoch `last` names now tracks (None without `last`)."""
    for _ in range(LINK_ATTEMPTS):
        if last is None:
            return None
        summary = summarise_epoch(layout, last)
        if summary is not None:
            return summary.metric
        last = link_state(layout, "last").epoch
    return None


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": cmd_list,
    "info": cmd_info,
    "verify": cmd_verify,
    "rollback": cmd_rollback,
    "prune": cmd_prune,
    "history": cmd_history,
    "plot": cmd_plot,
    "export": cmd_export,
}


class _PrintableStream:
    """A text stream that writes control characters as escapes (`text.printable`),
    but for the newlines, carriage returns and tabs that lay the output out: whatever a
    command prints from a tree, no escape sequence of it reaches the terminal. (Tables
    and error lines escape those too, `printable` per line: a tree's string is never a
    line of its own.)"""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return int(self._stream.write(printable(text, keep_layout=True)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (the console script exits with it)."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _PrintableStream(sys.stdout), _PrintableStream(sys.stderr)
    try:
        return _run(argv)
    finally:
        sys.stdout, sys.stderr = streams


def _run(argv: Sequence[str] | None) -> int:
    try:
        arguments = sys.argv[1:] if argv is None else argv
        # only the named command's parser; all of them for --help or a wrong command
        command = arguments[0] if arguments and arguments[0] in COMMANDS else None
        args = build_parser(command).parse_args(arguments)
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader went away (`candle-ckpt list | head`): nothing is wrong. Point
        # stdout at /dev/null so that the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except EpochVanishedError as error:
        return _fail(error, EXIT_VANISHED)
    except CorruptCheckpointError as error:
        return _fail(error, EXIT_CORRUPT)
    except (UsageError, CheckpointError, OSError, ValueError) as error:
        return _fail(error, EXIT_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as error:  # a bug: still one line, as promised, but say so
        return _fail(
            f"internal error, please report it: {type(error).__name__}: {error}", EXIT_ERROR
        )


def _fail(error: BaseException | str, status: int) -> int:
    print(f"{PROG}: error: {printable(str(error))}", file=sys.stderr)
    return status
