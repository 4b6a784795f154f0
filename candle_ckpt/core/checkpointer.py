"""The state of one training run's checkpointing, independent of any framework.

`Checkpointer` decides at each epoch end whether to save (policies), runs the save
protocol with a framework's writer function, records ckpt-info.json, repoints the links
and applies the keep policy. The Keras callback is a thin adapter around it; so are the
tests, with plain-file writers.
"""

from __future__ import annotations

import difflib
import functools
import os
import platform
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from .. import __version__
from .background import BackgroundWriter, TrashCollector
from .errors import CheckpointWriteError, LinkError, ParameterValueError
from .faults import fault_point
from .info import (
    CHECKSUM_DISABLED,
    FIRST_SAVE,
    FORMAT,
    FORMAT_VERSION,
    TIMESTAMP_FORMAT,
    finite_or_none,
    is_legacy,
)
from .layout import CheckpointLayout
from .lock import WriterLock
from .logs import silent_logger, tree_logger
from .params import validate_params
from .policies import BestMetric, epochs_to_keep, infer_metric_mode, save_reason
from .protocol import discard_epochs, point_link, prepare_tree, save_epoch
from .resume import legacy_best_epoch

WriteFiles = Callable[[str], str]
"""write_files(directory) -> the model file's name: writes an epoch's files there."""


@dataclass(frozen=True)
class SaveDecision:
    """That an epoch is saved, why, and the best-metric state as of that epoch."""
    epoch: int
    reason: str          # "best", "final", "interval" (or another caller's reason)
    improved: bool
    time: float          # time.time() at the epoch's end
    best_value: float
    best_epoch: int


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

    def __init__(self, gParameters, logger="DEFAULT", verbose=True, versions=None):
        self.settings = validate_params(gParameters, require_epochs=True)
        self.layout = CheckpointLayout(self.settings["ckpt_directory"])
        self.verbose = verbose
        self._logger = None if logger == "DEFAULT" else logger or silent_logger()
        metric = self.settings["ckpt_save_best_metric"]
        self.best = (BestMetric(metric, infer_metric_mode(
            metric, self.settings["ckpt_best_metric_mode"]))
            if self.settings["ckpt_save_best"] else None)
        self.run_epochs = []
        self.last_save_time = None
        self.prepared = False
        self.background = BackgroundWriter() if self.settings["ckpt_async"] else None
        self.versions = {"candle_ckpt": __version__, "python": platform.python_version(),
                         **(versions or {})}
        self.adapter_name: str | None = None
        self.model_format: str | None = None
        self.last_write_seconds: float | None = None  # the last save protocol that succeeded
        # Where a warm start (ckpt_init_from) took the initial weights from, for
        # ckpt-info.json: {"source": epoch directory, "epoch": int, "checksum": CRC32}.
        self.init_from: dict | None = None

    def describe_writer(self, adapter_name, model_format, versions):
        """Record which adapter and model-file format write, and their library versions."""
        self.adapter_name, self.model_format = adapter_name, model_format
        self.versions.update(versions)

    @property
    def logger(self):
        """The logger; the default one opens ckpt.log on first use, so that a process
        that never logs (a non-writer worker) leaves no file in the tree."""
        if self._logger is None:
            self._logger = tree_logger("save", self.layout, self.verbose)
        return self._logger

    # Created on first use, like the logger they log to: a non-writer never needs them.
    @functools.cached_property
    def trash(self):
        """The `TrashCollector` that empties this tree's trash/ in the background."""
        return TrashCollector(self.layout.trash, self.logger)

    @functools.cached_property
    def writer_lock(self):
        """The `WriterLock` on ckpts/.lock, held from `start_writing` to `finish`."""
        return WriterLock(self.layout.ckpts, self.logger)

    # -- restart -------------------------------------------------------------------

    def resume(self, info):
        """Continue the run recorded by `info`, the ckpt-info dict restart() loaded.

        Best-metric state, `epoch_best`, the keep policy's list and the time of the
        last save come from it. Epochs after `info["epoch"]` belong to an abandoned
        timeline and are not this run's.
        """
        epoch = info["epoch"]
        self.last_save_time = _parse_timestamp(info["timestamp"])
        if is_legacy(info):
            self.run_epochs = []
            best_epoch = legacy_best_epoch(self.layout, info)
        else:
            self.run_epochs = [e for e in info["epochs_saved"]
                               if e <= epoch and os.path.isdir(self.layout.epoch_dir(e))]
            best_epoch = info["epoch_best"]
        if self.best is None:
            return
        if info["save_best_metric"] != self.best.metric or (
                not is_legacy(info) and info["best_metric_mode"] != self.best.mode):
            self.logger.warning(
                "the checkpoint of epoch %d tracked %r (%s); this run tracks %r (%s): "
                "best-metric tracking starts afresh", epoch, info["save_best_metric"],
                info.get("best_metric_mode"), self.best.metric, self.best.mode)
            return
        self.best.value = finite_or_none(info["best_metric_last"])
        self.best.epoch = best_epoch if self.best.value is not None else None
        self.logger.info("resuming after epoch %d: best %s=%s at epoch %s, run epochs %s",
                         epoch, self.best.metric, self.best.value, self.best.epoch,
                         self.run_epochs)

    def start_writing(self):
        """Become the tree's one writer: take `ckpts/.lock`, then finish what a killed
        writer left (work/, trash/). Nothing happens when saving is disabled.

        Raises:
            WriterLockedError: another process writes this tree.
        """
        if self.settings["ckpt_save_interval"] == 0:
            return
        self.writer_lock.acquire()
        self._prepare_once()

    def _prepare_once(self):
        if not self.prepared:
            prepare_tree(self.layout, self.logger)
            self.trash.poke()  # deletions a killed writer left in trash/
            self.prepared = True

    # -- each epoch ------------------------------------------------------------------

    def epoch_end(self, epoch, logs, write_files):
        """Save 1-based `epoch` if the policy says so (`decide`, then `save`).

        Args:
            epoch: the 1-based epoch that just ended.
            logs: the metrics of the epoch (Keras' `logs`).
            write_files: callable(directory) -> model file name, writing the state.
        """
        decision = self.decide(epoch, logs)
        if decision is not None:
            self.save(decision, lambda: write_files)

    def decide(self, epoch, logs):
        """Whether 1-based `epoch` is saved: a `SaveDecision`, or None. Training thread.

        Updates the best-metric state; the decision carries a copy of it, so that a
        save running in the background records the state of its own epoch.
        """
        interval = self.settings["ckpt_save_interval"]
        improved = False
        if self.best is not None and interval > 0 and epoch >= self.settings["ckpt_skip_epochs"]:
            improved = self.best.update(self._metric_value(logs), epoch)
        reason = save_reason(epoch, final_epoch=self.settings["epochs"], interval=interval,
                             skip_epochs=self.settings["ckpt_skip_epochs"], improved=improved)
        if reason is None:
            self.logger.debug("epoch %d: not saved", epoch)
            return None
        return self.decision_now(epoch, reason, improved)

    def decision_now(self, epoch, reason, improved=False):
        """A `SaveDecision` for 1-based `epoch` with the best-metric state as it is now.

        `decide` makes one when the policy saves; call it right after a `decide` that
        returned None to be able to save that epoch anyway later (pre-emption), from a
        snapshot taken at the same time, with `save`.
        """
        best = self.best
        return SaveDecision(epoch, reason, improved, time.time(),
                            best.value if best else None, best.epoch if best else None)

    def save(self, decision, capture):
        """Save the epoch of `decision`; with ckpt_async, in the background.

        Args:
            decision: from `decide`.
            capture: callable() run on the calling (training) thread that takes what
                must be written (e.g. a host-memory snapshot of the model) and returns
                write_files(directory) -> model file name, which may run in another
                thread.

        With ckpt_async, the previous background save is waited for first (at most one
        in flight, and at most one snapshot held), and its error, if any, is raised
        here; `finish` waits for the last one.
        """
        self._prepare_once()
        if self.background is None:
            self._save_now(decision, capture())
        else:
            self.background.wait()
            write_files = capture()
            self.background.submit(lambda: self._save_now(decision, write_files))

    def finish(self):
        """Wait for a background save (raising its error), log the final report and
        release the writer lock."""
        try:
            if self.background is not None:
                self.background.wait()
            self.report_final()
        finally:
            self.writer_lock.release()

    def _save_now(self, decision, write_files):
        """Run the save protocol; an OSError becomes a CheckpointWriteError naming `last`."""
        started = time.monotonic()
        try:
            self._run_protocol(decision, write_files)
            self.last_write_seconds = time.monotonic() - started
        except OSError as error:
            # The next save starts by finishing what this one left (work/, trash/).
            self.prepared = False
            raise CheckpointWriteError(error.errno, (
                f"saving epoch {decision.epoch} into '{self.layout.ckpts}' failed: {error}; "
                f"'last' names epoch {self.layout.resolve_link('last')}")) from error
        finally:
            self.trash.poke()  # whatever the save moved aside, even if it failed

    def _run_protocol(self, decision, write_files):
        """Steps 2-8 of the save protocol for the epoch of `decision`."""
        epoch = decision.epoch
        info, written = save_epoch(
            self.layout, epoch, write_files,
            lambda written: self._build_info(decision, written),
            compute_checksums=self.settings["ckpt_checksum"], logger=self.logger)
        self.last_save_time = decision.time
        if self.best is not None:
            self._point_best(decision.best_epoch)
        fault_point("after_best")
        point_link(self.layout, "last", epoch)
        fault_point("after_last")
        self.run_epochs = info["epochs_saved"]
        self._apply_keep_policy(epoch, decision.best_epoch)
        self.logger.info("epoch %d saved (%s%s): %d bytes in %.3f s (%.1f MB/s) -> %s",
                         epoch, decision.reason,
                         ", best" if decision.improved and decision.reason != "best" else "",
                         written.nbytes, written.write_seconds,
                         written.nbytes / 1e6 / max(written.write_seconds, 1e-9),
                         self.layout.epoch_dir(epoch))

    def report_final(self):
        """Log how many of this run's epochs are kept, and which."""
        if self.last_save_time is None:
            self.logger.info("this run saved no checkpoint")
            return
        self.logger.info("checkpoints kept: %d", len(self.run_epochs))
        self.logger.info("checkpoints list: %s", self.run_epochs)

    # -- helpers ---------------------------------------------------------------------

    def _metric_value(self, logs):
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
            f"{f' (did you mean {near[0]!r}?)' if near else ''}, or ckpt_save_best=false")

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
            self.best.metric, what, sorted(reported))

    def _build_info(self, decision, written):
        crc = written.files[written.model_file]["crc32"]
        elapsed = FIRST_SAVE if self.last_save_time is None else round(
            max(decision.time - self.last_save_time, 0.0), 3)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "epoch": decision.epoch,
            "model_file": written.model_file,
            "checksum": crc if crc is not None else CHECKSUM_DISABLED,
            "save_best_metric": self.best.metric if self.best else None,
            "best_metric_last": finite_or_none(decision.best_value),
            "timestamp": time.strftime(TIMESTAMP_FORMAT, time.localtime(decision.time)),
            "time_elapsed": elapsed,
            "metadata": self.settings["metadata"],
            "files": written.files,
            "best_metric_mode": self.best.mode if self.best else None,
            "epoch_best": decision.best_epoch,
            "epochs_saved": sorted(set(self.run_epochs) | {decision.epoch}),
            "weights_only": self.settings["ckpt_save_weights_only"],
            "write_seconds": round(written.write_seconds, 6),
            "versions": self.versions,
            **({"adapter": self.adapter_name, "model_format": self.model_format}
               if self.adapter_name else {}),
        }

    def _point_best(self, wanted):
        """Make `best` point at epoch `wanted` (None: no link), repairing it after a restart."""
        if wanted is not None and not os.path.isdir(self.layout.epoch_dir(wanted)):
            self.logger.warning("best epoch %d is no longer on disk; removing the best link",
                                wanted)
            wanted = None
        try:
            current = self.layout.resolve_link("best")
        except LinkError as error:
            self.logger.warning("replacing an invalid best link: %s", error)
            current = error
        if current != wanted or (wanted is None and os.path.lexists(self.layout.link("best"))):
            point_link(self.layout, "best", wanted)

    def _apply_keep_policy(self, epoch, best_epoch):
        keep = epochs_to_keep(self.run_epochs, epoch, self.settings["ckpt_keep_mode"],
                              self.settings["ckpt_keep_limit"])
        keep |= {epoch, best_epoch} - {None}
        doomed = [e for e in self.run_epochs if e not in keep]
        discard_epochs(self.layout, doomed, self.logger)
        self.run_epochs = [e for e in self.run_epochs if e in keep]


def _parse_timestamp(text):
    try:
        return time.mktime(time.strptime(text, TIMESTAMP_FORMAT))
    except ValueError:
        return None

