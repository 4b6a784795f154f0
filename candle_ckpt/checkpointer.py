"""The state of one training run's checkpointing, independent of any framework.

`Checkpointer` decides at each epoch end whether to save (policies), runs the save
protocol with a framework's writer function, records ckpt-info.json, repoints the links
and applies the keep policy. The Keras callback is a thin adapter around it; so are the
tests, with plain-file writers.
"""

import datetime
import os
import platform
import time

from . import __version__
from .errors import LinkError, ParameterValueError
from .faults import fault_point
from .info import (CHECKSUM_DISABLED, FIRST_SAVE, FORMAT, FORMAT_VERSION,
                   TIMESTAMP_FORMAT, finite_or_none, is_legacy)
from .layout import CheckpointLayout
from .logs import silent_logger, tree_logger
from .params import validate_params
from .policies import BestMetric, epochs_to_keep, infer_metric_mode, save_reason
from .protocol import discard_epochs, point_link, prepare_tree, save_epoch


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
        self.save_best = self.settings["ckpt_save_best"]
        self.best = (BestMetric(metric, infer_metric_mode(
            metric, self.settings["ckpt_best_metric_mode"])) if self.save_best else None)
        self.run_epochs = []
        self.last_save_time = None
        self.prepared = False
        self.versions = {"candle_ckpt": __version__, "python": platform.python_version(),
                         **(versions or {})}

    @property
    def logger(self):
        """The logger; the default one opens ckpt.log on first use, so that a process
        that never logs (a non-writer worker) leaves no file in the tree."""
        if self._logger is None:
            self._logger = tree_logger("save", self.layout, self.verbose)
        return self._logger

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
            best_epoch = self.layout.resolve_link("best")
            if best_epoch is not None and best_epoch > epoch:
                best_epoch = None
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

    # -- each epoch ------------------------------------------------------------------

    def epoch_end(self, epoch, logs, write_files):
        """Save 1-based `epoch` if the policy says so; return the ckpt-info dict or None.

        Args:
            epoch: the 1-based epoch that just ended.
            logs: the metrics of the epoch (Keras' `logs`).
            write_files: callable(directory) -> model file name, writing the state.
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
        if improved and reason != "best":
            reason += ", best"
        return self.save_now(epoch, write_files, reason)

    def save_now(self, epoch, write_files, reason):
        """Save 1-based `epoch`, then repoint the links and apply the keep policy.

        `epoch_end` calls it when the policy says so; call it directly to save whatever
        the policy says (pre-emption), after `epoch_end` has seen that epoch: the
        best-metric state is the one recorded then. `write_files` must write the state
        as it was at the end of `epoch` (e.g. from a snapshot taken then); `reason` is
        logged. Returns the ckpt-info dict.
        """
        if not self.prepared:
            prepare_tree(self.layout, self.logger)
            self.prepared = True
        now = time.time()
        info, written = save_epoch(
            self.layout, epoch, write_files,
            lambda written: self._build_info(epoch, written, now),
            checksum=self.settings["ckpt_checksum"], logger=self.logger)
        self.last_save_time = now
        if self.best is not None:
            self._point_best()
        fault_point("after_best")
        point_link(self.layout, "last", epoch)
        fault_point("after_last")
        self.run_epochs = info["epochs_saved"]
        self._apply_keep_policy(epoch)
        self.logger.info("epoch %d saved (%s): %d bytes in %.3f s (%.1f MB/s) -> %s",
                         epoch, reason, written.nbytes, written.write_seconds,
                         written.nbytes / 1e6 / max(written.write_seconds, 1e-9),
                         self.layout.epoch_dir(epoch))
        return info

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
        if self.best.metric not in logs:
            raise ParameterValueError(
                f"parameter 'ckpt_save_best_metric' is {self.best.metric!r}, which is not "
                f"in this epoch's metrics {sorted(logs)}; expected one of them "
                f"(or ckpt_save_best=false)")
        return float(logs[self.best.metric])

    def _build_info(self, epoch, written, now):
        crc = written.files[written.model_file]["crc32"]
        elapsed = FIRST_SAVE if self.last_save_time is None else round(
            max(now - self.last_save_time, 0.0), 3)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "model_file": written.model_file,
            "checksum": crc if crc is not None else CHECKSUM_DISABLED,
            "save_best_metric": self.best.metric if self.best else None,
            "best_metric_last": finite_or_none(self.best.value) if self.best else None,
            "timestamp": datetime.datetime.fromtimestamp(now).strftime(TIMESTAMP_FORMAT),
            "time_elapsed": elapsed,
            "metadata": self.settings["metadata"],
            "files": written.files,
            "best_metric_mode": self.best.mode if self.best else None,
            "epoch_best": self.best.epoch if self.best else None,
            "epochs_saved": sorted(set(self.run_epochs) | {epoch}),
            "weights_only": self.settings["ckpt_save_weights_only"],
            "write_seconds": round(written.write_seconds, 6),
            "versions": self.versions,
        }

    def _point_best(self):
        """Make `best` point at the best epoch of this run, repairing it after a restart."""
        wanted = self.best.epoch
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

    def _apply_keep_policy(self, epoch):
        keep = epochs_to_keep(self.run_epochs, epoch, self.settings["ckpt_keep_mode"],
                              self.settings["ckpt_keep_limit"])
        keep |= {epoch}
        if self.best is not None and self.best.epoch is not None:
            keep.add(self.best.epoch)
        doomed = [e for e in self.run_epochs if e not in keep]
        discard_epochs(self.layout, doomed, self.logger)
        self.run_epochs = [e for e in self.run_epochs if e in keep]


def _parse_timestamp(text):
    try:
        return datetime.datetime.strptime(text, TIMESTAMP_FORMAT).timestamp()
    except ValueError:
        return None

