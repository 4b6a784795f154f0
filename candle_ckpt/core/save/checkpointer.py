"""The state of one training run's checkpointing, independent of any framework.

`Checkpointer` decides at each epoch end whether to save (policies), runs the save
protocol with a framework's writer function, records ckpt-info.json, repoints the links
and applies the keep policy. The Keras callback is a thin adapter around it; so are the
tests, with plain-file writers.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import functools
import logging
import os
import platform
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ... import __version__
from ..storage import tree_fs
from ..storage.background import BackgroundWriter, TrashCollector
from ..errors import (
    CheckpointFormatError,
    CheckpointWriteError,
    ParameterValueError,
    UnsafePathError,
)
from ..storage.faults import fault_point
from ..format.history import HistoryWriter, utc_time
from ..format.info import (
    CHECKSUM_DISABLED,
    FIRST_SAVE,
    FORMAT,
    FORMAT_VERSION,
    STEP_FORMAT_VERSION,
    TIMESTAMP_FORMAT,
    CheckpointInfo,
    checkpoint_info,
    finite_or_none,
    numeric_metrics,
    read_info,
    read_lineage,
)
from ..format.layout import STEP_LINK
from ..format.locate import run_layout
from ..format.steps import last_identity
from ..run.lock import WriterLock
from ..logs import LibraryLogger, log_to_file_only, silent_logger, tree_logger
from ..params import validate_params
from .policies import BestMetric, epochs_to_keep, infer_metric_mode, save_reason
from .protocol import (
    ModelFile,
    WrittenFiles,
    discard_epochs,
    discard_steps,
    point_step_link,
    prepare_tree,
    repoint_links,
    save_epoch,
)
from ..restore.resume import legacy_best_epoch

WriteFiles = Callable[[str], str | ModelFile]
"""write_files(directory) -> the model file's name, or a `protocol.ModelFile` with its
CRC32 too: writes an epoch's files there."""


@dataclass(frozen=True)
class SaveDecision:
    """That an epoch is saved, why, and the best-metric state and metrics of that epoch.

    With `batch` > 0, a step checkpoint: `epoch` epochs completed and `batch` batches
    of the next one (docs/FORMAT.md, "Step checkpoints")."""

    epoch: int
    reason: str  # "best", "final", "interval", "steps" (or another caller's reason)
    improved: bool
    time: float  # time.time() at the epoch's end
    best_value: float | None
    best_epoch: int | None
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    train_seconds: float | None = None
    batch: int = 0

    def describe(self) -> str:
        """ "epoch 3", or "epoch 3, batch 150" for a step checkpoint inside epoch 3."""
        if self.batch:
            return f"epoch {self.epoch + 1}, batch {self.batch}"
        return f"epoch {self.epoch}"


class Checkpointer:
    """Saves the epochs of one run into a checkpoint tree, per the `--ckpt_*` settings.

    Args:
        gParameters: the parameter dict; every `ckpt_*` key is checked here, before
            anything is written, and `epochs` is required.
        logger: "DEFAULT" for the `candle_ckpt.save` logger writing to ckpt.log (and
            the console when `verbose`), a `logging.Logger` to use instead, or None.
        verbose: INFO messages on the console too.
        versions: library versions recorded in every ckpt-info.json.
    """

    def __init__(
        self,
        gParameters: Mapping[str, Any],
        logger: LibraryLogger | Literal["DEFAULT"] | None = "DEFAULT",
        verbose: bool = True,
        versions: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = validate_params(gParameters, require_epochs=True)
        self.layout = run_layout(self.settings)
        self.verbose = verbose
        self._logger: LibraryLogger | None = (
            None if logger == "DEFAULT" else logger or silent_logger()
        )
        metric = self.settings["ckpt_save_best_metric"]
        self.best = (
            BestMetric(
                metric,
                infer_metric_mode(metric, self.settings["ckpt_best_metric_mode"]),
                value=self.settings["ckpt_best_metric_last"],  # resume() replaces it
            )
            if self.settings["ckpt_save_best"]
            else None
        )
        self.run_epochs: list[int] = []
        self.last_save_time: float | None = None
        self.prepared = False
        self.background = BackgroundWriter() if self.settings["ckpt_async"] else None
        self.versions = {
            "candle_ckpt": __version__,
            "python": platform.python_version(),
            **(versions or {}),
        }
        self.adapter_name: str | None = None
        self.model_format: str | None = None
        self.last_write_seconds: float | None = None  # the last save protocol that succeeded
        self.last_save_bytes: int | None = None  # the bytes of that save's files
        self.run_id = uuid.uuid4().hex
        self.run_started = utc_time(time.time())
        # The lineage: this run and the runs it resumed, back to one started from scratch
        # (docs/FORMAT.md); the keep policy deletes only the lineage's epochs.
        self.lineage_id = self.run_id
        self.lineage_format1_epoch: int | None = None
        # Set by the warm-start helper: {"source", "epoch", "checksum"} of the weights
        # this run started from, recorded in every ckpt-info.json it writes.
        self.init_from: dict[str, Any] | None = None

    def describe_writer(
        self, adapter_name: str, model_format: str, versions: Mapping[str, str]
    ) -> None:
        """Record which adapter and model-file format write, and their library versions."""
        self.adapter_name, self.model_format = adapter_name, model_format
        self.versions.update(versions)

    @property
    def logger(self) -> LibraryLogger:
        """The logger; the default one opens ckpt.log on first use, so that a process
        that never logs (a non-writer worker) leaves no file in the tree."""
        if self._logger is None:
            self._logger = tree_logger("save", self.layout, self.verbose)
        return self._logger

    # Created on first use, like the logger they log to: a non-writer never needs them.
    @functools.cached_property
    def trash(self) -> TrashCollector:
        """The `TrashCollector` that empties this tree's trash/ in the background."""
        return TrashCollector(self.layout, self.logger)

    @functools.cached_property
    def history(self) -> HistoryWriter:
        """The `HistoryWriter` appending this run's lines to ckpts/history.jsonl."""
        return HistoryWriter(
            self.layout.ckpts,
            {"run_id": self.run_id, "run_started": self.run_started, "lineage_id": self.lineage_id},
        )

    @functools.cached_property
    def writer_lock(self) -> WriterLock:
        """The `WriterLock` on ckpts/.lock, held from `start_writing` to `finish`."""
        return WriterLock(self.layout.ckpts, self.logger)

    # -- restart -------------------------------------------------------------------

    def resume(self, info: Mapping[str, Any]) -> None:
        """Continue the run recorded by `info`, the ckpt-info dict restart() loaded.

        Best-metric state, `epoch_best`, the lineage (with its warm start's provenance,
        `init_from`: the weights still descend from it), the keep policy's epochs and the
        time of the last save come from it. Epochs after `info["epoch"]` belong to an
        abandoned timeline and are not this run's.
        """
        resumed = checkpoint_info(info)
        epoch = resumed.epoch
        self.last_save_time = _parse_timestamp(resumed.timestamp)
        if resumed.format_version is not None and resumed.format_version >= 2:
            self.lineage_id = resumed.lineage_id or self.run_id
            self.lineage_format1_epoch = resumed.lineage_format1_epoch
            self.init_from = None if resumed.init_from is None else dict(resumed.init_from)
        elif not resumed.legacy:  # format 1: this lineage continues that run
            self.lineage_format1_epoch = epoch
        self.run_epochs = self._lineage_epochs(resumed)
        best_epoch = resumed.epoch_best
        if resumed.legacy:  # upstream CANDLE records no best epoch
            best_epoch = legacy_best_epoch(self.layout, info)
        if self.best is None:
            return
        if resumed.save_best_metric != self.best.metric or (
            resumed.best_metric_mode not in (None, self.best.mode)
        ):
            self.logger.warning(
                "the checkpoint of epoch %d tracked %r (%s); this run tracks %r (%s): "
                "best-metric tracking starts afresh",
                epoch,
                resumed.save_best_metric,
                resumed.best_metric_mode,
                self.best.metric,
                self.best.mode,
            )
            return
        self.best.value = resumed.best_metric_last
        self.best.epoch = best_epoch if self.best.value is not None else None
        self.logger.info(
            "resuming after epoch %d: best %s=%s at epoch %s, run epochs %s",
            epoch,
            self.best.metric,
            self.best.value,
            self.best.epoch,
            self.run_epochs,
        )

    def _lineage_epochs(self, resumed: CheckpointInfo) -> list[int]:
        """The epochs on disk, up to the resumed one, that this lineage saved.

        What format 1 listed in `epochs_saved` (docs/FORMAT.md, "Keep policies across
        restarts"): version 2 epochs carrying this `lineage_id`, and when the lineage
        continued a format 1 run, that run's epochs the format 1 checkpoint resumed
        from listed. Read once per restart, never per save.
        """
        if resumed.legacy:
            return []
        format1_epoch = self.lineage_format1_epoch
        # None: every format 1 epoch up to format1_epoch (its list is unreadable or gone)
        format1_saved: set[int] | None = None
        if resumed.format_version == 1:
            format1_saved = set(resumed.epochs_saved or ())
        elif format1_epoch is not None:
            format1_saved = self._format1_epochs_saved(format1_epoch)
        mine = []
        for epoch in self.layout.list_epochs():
            # a step checkpoint's own epoch E may be another lineage's: checked below
            if epoch > resumed.epoch or (epoch == resumed.epoch and not resumed.batch):
                mine += [epoch] if epoch == resumed.epoch else []
                break
            version, lineage = read_lineage(self.layout.epoch_dir(epoch))
            if version >= 2:
                if lineage == self.lineage_id:
                    mine.append(epoch)
            elif (
                version == 1
                and format1_epoch is not None
                and epoch <= format1_epoch
                and (format1_saved is None or epoch in format1_saved)
            ):
                mine.append(epoch)
        return mine

    def _format1_epochs_saved(self, format1_epoch: int) -> set[int] | None:
        """`epochs_saved` of the format 1 checkpoint this lineage resumed from, or None
        when it is gone (deleted by the keep policy) or unreadable."""
        try:
            saved = checkpoint_info(read_info(self.layout.epoch_dir(format1_epoch))).epochs_saved
        except (OSError, CheckpointFormatError) as error:
            self.logger.info(
                "the format 1 checkpoint of epoch %d is gone or unreadable "
                "(%s): the keep policy counts every format 1 epoch up to it "
                "as this run's",
                format1_epoch,
                error,
            )
            return None
        return set(saved or ())

    def start_writing(self) -> None:
        """Become the tree's one writer: take `ckpts/.lock`, then finish what a killed
        writer left (work/, trash/). Nothing happens when saving is disabled.

        Raises:
            UnsafePathError: a path the writer writes is a link or of the wrong kind
                (core/storage/tree_fs.py); refused before the lock or anything else is written.
            WriterLockedError: another process writes this tree.
        """
        if self.settings["ckpt_save_interval"] == 0:
            return
        tree_fs.refuse_unsafe_tree(self.layout)
        self.writer_lock.acquire()
        self._prepare_once()

    def _prepare_once(self) -> None:
        if not self.prepared:
            prepare_tree(self.layout, self.logger)
            self.trash.poke()  # deletions a killed writer left in trash/
            self.prepared = True

    # -- each epoch ------------------------------------------------------------------

    def epoch_end(
        self, epoch: int, logs: Mapping[str, Any] | None, write_files: WriteFiles
    ) -> None:
        """Record 1-based `epoch` in the history and save it if the policy says so.

        Args:
            epoch: the 1-based epoch that just ended.
            logs: the metrics of the epoch (Keras' `logs`).
            write_files: callable(directory) -> model file name, writing the state.
        """
        self.record_epoch(epoch, logs, None)
        decision = self.decide(epoch, logs)
        if decision is not None:
            self.save_captured(decision, write_files)

    def record_epoch(
        self, epoch: int, logs: Mapping[str, Any] | None, train_seconds: float | None
    ) -> None:
        """Append 1-based `epoch`'s metrics to the history (saved or not).

        Nothing is recorded when saving is disabled (ckpt_save_interval 0: the tree is
        not written at all). A failure to append is logged, not raised: the history is
        a record for people, and training goes on without it. So is a history file
        replaced by a link while the job runs (refused, not followed).
        """
        if self.settings["ckpt_save_interval"] == 0:
            return
        try:
            self.history.record_epoch(epoch, numeric_metrics(logs), train_seconds)
        except (OSError, UnsafePathError) as error:
            self.logger.error("epoch %d: not recorded in %s: %s", epoch, self.history.path, error)

    def decide(
        self, epoch: int, logs: Mapping[str, Any] | None, train_seconds: float | None = None
    ) -> SaveDecision | None:
        """Whether 1-based `epoch` is saved: a `SaveDecision`, or None. Training thread.

        Updates the best-metric state; the decision carries a copy of it, so that a
        save running in the background records the state of its own epoch.
        """
        interval = self.settings["ckpt_save_interval"]
        improved = False
        if self.best is not None and interval > 0 and epoch >= self.settings["ckpt_skip_epochs"]:
            improved = self.best.update(self._metric_value(logs), epoch)
        reason = save_reason(
            epoch,
            final_epoch=self.settings["epochs"],
            interval=interval,
            skip_epochs=self.settings["ckpt_skip_epochs"],
            improved=improved,
        )
        if reason is None:
            self.logger.debug("epoch %d: not saved", epoch)
            return None
        return self.decision_with_current_best(epoch, reason, improved, logs, train_seconds)

    def decision_with_current_best(
        self,
        epoch: int,
        reason: str,
        improved: bool = False,
        logs: Mapping[str, Any] | None = None,
        train_seconds: float | None = None,
    ) -> SaveDecision:
        """A `SaveDecision` for 1-based `epoch` carrying the best-metric state as it is now.

        `decide` makes one when the policy saves; call it right after a `decide` that
        returned None to be able to save that epoch anyway later (pre-emption), from a
        snapshot taken at the same time, with `save_captured`.
        """
        best = self.best
        return SaveDecision(
            epoch,
            reason,
            improved,
            time.time(),
            best.value if best else None,
            best.epoch if best else None,
            numeric_metrics(logs),
            train_seconds,
        )

    def step_decision(self, epoch: int, batch: int, reason: str) -> SaveDecision:
        """A `SaveDecision` for a step checkpoint after `epoch` completed epochs and
        `batch` batches of the next, with the best-metric state as it is now (of the
        last completed epoch: a step records no metrics)."""
        return dataclasses.replace(self.decision_with_current_best(epoch, reason), batch=batch)

    def save(self, decision: SaveDecision, capture: Callable[[], WriteFiles]) -> None:
        """Save the epoch of `decision`; with ckpt_async, in the background.

        Args:
            decision: from `decide`.
            capture: callable() run on the calling (training) thread that takes what
                must be written (e.g. a host-memory snapshot of the model) and returns
                write_files(directory) -> model file name, which may run in another
                thread.

        With ckpt_async, the previous background save is waited for first (at most one
        in flight, and at most one snapshot held: `capture` may reuse its memory), and
        its error, if any, is raised here; `finish` waits for the last one.
        """
        started = time.perf_counter()
        if self.background is not None:
            self.background.wait()
        self.save_captured(decision, capture(), started)

    def save_captured(
        self, decision: SaveDecision, write_files: WriteFiles, started: float | None = None
    ) -> None:
        """Save the epoch of `decision` from state already captured into `write_files`
        (see `save`); `started` is when the save began (perf_counter), default now."""
        started = time.perf_counter() if started is None else started
        self._prepare_once()
        if self.background is None:
            self._save_now(decision, write_files, started)
        else:
            self.background.wait()
            self.background.submit(lambda: self._save_now(decision, write_files, started))

    def finish(self) -> None:
        """Wait for a background save (raising its error), log the final report and
        release the writer lock."""
        try:
            if self.background is not None:
                self.background.wait()
            self.report_final()
        finally:
            self.writer_lock.release()

    def _save_now(self, decision: SaveDecision, write_files: WriteFiles, started: float) -> None:
        """Run the save protocol; an OSError becomes a CheckpointWriteError naming `last`."""
        write_started = time.perf_counter()
        try:
            self.last_save_bytes = self._run_protocol(decision, write_files, started)
            self.last_write_seconds = time.perf_counter() - write_started
        except OSError as error:
            # The next save starts by finishing what this one left (work/, trash/).
            self.prepared = False
            message = (
                f"saving {decision.describe()} into '{self.layout.ckpts}' failed: {error}; "
                f"'last' names epoch {self.layout.resolve_link('last')}"
                f"{out_of_space_remedy(error, self.layout.ckpts, self.last_save_bytes)}"
            )
            # Raised, so whoever catches it shows it on the console (in one line).
            log_to_file_only(self.logger, logging.ERROR, "SAVE FAILED: %s", message)
            raise CheckpointWriteError(error.errno, message) from error
        finally:
            self.trash.poke()  # whatever the save moved aside, even if it failed
        try:
            if decision.batch:
                self.history.record_step_saved(
                    decision.epoch, decision.batch, decision.reason, time.perf_counter() - started
                )
            else:
                self.history.record_saved(
                    decision.epoch, decision.reason, time.perf_counter() - started
                )
        except (OSError, UnsafePathError) as error:
            self.logger.error(
                "%s: its save is not recorded in %s: %s",
                decision.describe(),
                self.history.path,
                error,
            )

    def _run_protocol(self, decision: SaveDecision, write_files: WriteFiles, started: float) -> int:
        """Steps 2-8 of the save protocol for the epoch of `decision`; return the bytes
        of the epoch's files."""
        epoch = decision.epoch
        _, written = save_epoch(
            self.layout,
            epoch,
            write_files,
            lambda written: self._build_info(decision, written, started),
            compute_checksums=self.settings["ckpt_checksum"],
            logger=self.logger,
            batch=decision.batch,
        )
        self.last_save_time = decision.time
        if decision.batch:
            step = (epoch, decision.batch)
            point_step_link(self.layout, step)
            fault_point("after_step_link")
            discard_steps(self.layout, step, self.logger)
            self._log_saved(decision, written, self.layout.step_dir(*step))
            return written.nbytes
        repoint_links(
            self.layout,
            epoch,
            self._best_on_disk(decision.best_epoch),
            self.logger,
            update_best=self.best is not None,
        )
        fault_point("after_last")
        # `last` moved on, so a step checkpoint no longer continues it (its after_last
        # names the previous one): superseded, whether or not this removal completes.
        if os.path.lexists(self.layout.link(STEP_LINK)) or self.layout.list_steps():
            point_step_link(self.layout, None)
            discard_steps(self.layout, None, self.logger)
        if not self.run_epochs or self.run_epochs[-1] != epoch:
            self.run_epochs.append(epoch)
        self._apply_keep_policy(epoch, decision.best_epoch)
        self._log_saved(decision, written, self.layout.epoch_dir(epoch))
        return written.nbytes

    def _log_saved(self, decision: SaveDecision, written: WrittenFiles, directory: str) -> None:
        self.logger.info(
            "%s saved (%s%s): %d bytes in %.3f s (%.1f MB/s) -> %s",
            decision.describe(),
            decision.reason,
            ", best" if decision.improved and decision.reason != "best" else "",
            written.nbytes,
            written.write_seconds,
            written.nbytes / 1e6 / max(written.write_seconds, 1e-9),
            directory,
        )

    def report_final(self) -> None:
        """Log how many of this run's epochs are kept, and which."""
        if self.last_save_time is None:
            self.logger.info("this run saved no checkpoint")
            return
        self.logger.info("checkpoints kept: %d", len(self.run_epochs))
        self.logger.info("checkpoints list: %s", self.run_epochs)

    # -- helpers ---------------------------------------------------------------------

    def _metric_value(self, logs: Mapping[str, Any] | None) -> float:
        assert self.best is not None, "called only when a metric is tracked (decide)"
        logs = logs or {}
        self.check_metric_in(logs, "this epoch's metrics")
        return float(logs[self.best.metric])

    def check_metric_in(self, names: Collection[str], what: str) -> None:
        """Raise unless the tracked metric is one of `names` (all of `what`).

        Raises:
            ParameterValueError: naming the metric, every name and the nearest one.
        """
        if self.best is None or self.settings["ckpt_save_interval"] == 0:
            return
        metric = self.best.metric
        if metric in names:
            return
        near = difflib.get_close_matches(metric, list(names), n=1)
        raise ParameterValueError(
            f"parameter 'ckpt_save_best_metric' is {metric!r}, which is not in {what} "
            f"{sorted(names)}; expected one of them"
            f"{f' (did you mean {near[0]!r}?)' if near else ''}, or ckpt_save_best=false"
        )

    def check_metric_early(self, reported: Collection[str], what: str) -> None:
        """Before the first epoch ends: refuse a tracked metric that is a near miss of
        one of `reported`, the metrics known so far (`what`).

        Other callbacks may add metrics to an epoch's logs at its end, so a name far
        from every reported one is only warned about here; `decide` then checks the
        complete logs of the first epoch that can be saved, before saving it. A near
        miss is a typo.

        Raises:
            ParameterValueError: as `check_metric_in`.
        """
        if self.best is None or self.settings["ckpt_save_interval"] == 0:
            return
        if self.best.metric in reported:
            return
        if difflib.get_close_matches(self.best.metric, list(reported), n=1):
            self.check_metric_in(reported, what)
        self.logger.warning(
            "ckpt_save_best_metric %r is not among %s %s: unless another callback adds "
            "it to the epoch's logs, the first epoch that can be saved will fail",
            self.best.metric,
            what,
            sorted(reported),
        )

    def _build_info(
        self, decision: SaveDecision, written: WrittenFiles, started: float
    ) -> dict[str, Any]:
        """The version 2 ckpt-info dict of the epoch of `decision` (docs/FORMAT.md).

        The upstream keys and those `candle-ckpt list` shows come first, `run_id` right
        after them: a survey parses each file only up to `run_id` (operator/json_head.py).
        """
        crc = written.files[written.model_file]["crc32"]
        elapsed = (
            FIRST_SAVE
            if self.last_save_time is None
            else round(max(decision.time - self.last_save_time, 0.0), 3)
        )
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "epoch": decision.epoch,
            "timestamp": time.strftime(TIMESTAMP_FORMAT, time.localtime(decision.time)),
            "save_best_metric": self.best.metric if self.best else None,
            "best_metric_mode": self.best.mode if self.best else None,
            "best_metric_last": finite_or_none(decision.best_value),
            "epoch_best": decision.best_epoch,
            "metrics": dict(decision.metrics),
            "model_file": written.model_file,
            "checksum": crc if crc is not None else CHECKSUM_DISABLED,
            "files": written.files,
            "time_elapsed": elapsed,
            "metadata": self.settings["metadata"],
            "run_id": self.run_id,
            "run_started": self.run_started,
            "lineage_id": self.lineage_id,
            "lineage_format1_epoch": self.lineage_format1_epoch,
            "train_seconds": (
                None
                if decision.train_seconds is None
                else round(max(decision.train_seconds, 0.0), 6)
            ),
            "save_seconds": round(max(time.perf_counter() - started, 0.0), 6),
            "write_seconds": round(written.write_seconds, 6),
            "weights_only": self.settings["ckpt_save_weights_only"],
            "versions": self.versions,
        }
        if self.adapter_name:
            info.update(adapter=self.adapter_name, model_format=self.model_format)
        if self.init_from is not None:
            info["init_from"] = dict(self.init_from)
        if decision.batch:
            info.update(
                format_version=STEP_FORMAT_VERSION,
                batch=decision.batch,
                after_last=last_identity(self.layout),
            )
        return info

    def _best_on_disk(self, wanted: int | None) -> int | None:
        """`wanted`, or None (no best link) when a restart finds that epoch deleted."""
        if wanted is not None and not os.path.isdir(self.layout.epoch_dir(wanted)):
            self.logger.warning(
                "best epoch %d is no longer on disk; removing the best link", wanted
            )
            return None
        return wanted

    def _apply_keep_policy(self, epoch: int, best_epoch: int | None) -> None:
        mode = self.settings["ckpt_keep_mode"]
        if mode == "all":  # nothing to delete: skip the O(epochs) pass on every save
            return
        keep = epochs_to_keep(self.run_epochs, epoch, mode, self.settings["ckpt_keep_limit"])
        keep.add(epoch)
        if best_epoch is not None:
            keep.add(best_epoch)
        doomed = [e for e in self.run_epochs if e not in keep]
        discard_epochs(self.layout, doomed, self.logger)
        self.run_epochs = [e for e in self.run_epochs if e in keep]


def _parse_timestamp(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text, TIMESTAMP_FORMAT))
    except ValueError:
        return None


def out_of_space_remedy(error: OSError, directory: str, save_bytes: int | None) -> str:
    """For a save that failed with ENOSPC or EDQUOT, what to do, with the free space of
    `directory`'s file system and `save_bytes`, what the last successful save wrote
    (None: none yet); for any other error, nothing.

    The two differ in their remedy: a full file system is freed, or left for a larger
    one; an exceeded quota (the user's or the group's, e.g. Lustre's and GPFS's
    project quotas) is freed within the quota or raised, and statvfs's free space does
    not show it.
    """
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return ""
    try:
        found = os.statvfs(directory)
        free = f"{_megabytes(found.f_bavail * found.f_frsize)} free"
    except OSError as statvfs_error:
        free = f"free space unknown ({statvfs_error.strerror})"
    needed = (
        f"the last save wrote {_megabytes(save_bytes)}"
        if save_bytes is not None
        else "no save of this run succeeded yet"
    )
    if error.errno == errno.EDQUOT:
        return (
            f". The disk quota is exceeded (its file system has {free}; {needed}): "
            f"delete files counted in the quota or ask for a larger one (see `quota -s`, "
            f"`lfs quota -u $USER DIR`), then rerun: the job resumes from 'last'"
        )
    return (
        f". The file system is full ({free}; {needed}): free space on it (e.g. "
        f"`candle-ckpt prune`) or move ckpt_directory to a larger one, then rerun: the "
        f"job resumes from 'last'"
    )


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3f} MB"
