"""CandleCheckpointCallback: save a crash-consistent checkpoint at the end of epochs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from ..core.logs import set_progress_line_open
from ..core.run.session import TrainingSession
from . import deferred, steps
from .adapter import KerasAdapter


class CandleCheckpointCallback(keras.callbacks.Callback):
    """Checkpoint a Keras training run so a killed job restarts exactly where it stopped.

    At the end of every epoch it decides whether to save (`ckpt_save_interval`,
    `ckpt_skip_epochs`, an improvement of `ckpt_save_best_metric`, the final epoch), then
    writes the weights, the optimizer state and the RNG state into
    `<ckpt_directory>/ckpts/work/model.h5`, fsyncs and checksums it, records
    `ckpt-info.json`, renames `work` to `epochs/NNN` and atomically repoints the
    relative links `best` and `last`. It then deletes this run's epochs the keep policy
    (`ckpt_keep_mode`, `ckpt_keep_limit`) no longer wants, never `last` or `best`.

    Use it with `restart()`, which resumes from `last`::

        J = candle_ckpt.restart(params, model)
        initial_epoch = J["epoch"] if J else 0
        ckpt = candle_ckpt.CandleCheckpointCallback(params)
        model.fit(x, y, validation_data=(xv, yv), epochs=params["epochs"],
                  initial_epoch=initial_epoch, callbacks=[ckpt])

    If `restart()` found the model unbuilt (a subclassed model before its first call),
    the callback loads the checkpoint it verified once fit has built the model, before
    the first training step (`candle_ckpt.keras.deferred`).

    When fit starts at `initial_epoch > 0`, the callback reads that epoch's
    ckpt-info.json and continues its best-metric state, best epoch, keep-policy list
    and save times; epochs after it (a timeline abandoned by a rollback) are replaced as
    training reaches them.

    In a multi-process job only one process writes (see `candle_ckpt.core.run.writer`):
    by default the chief of a `MultiWorkerMirroredStrategy`, else the chief or worker 0
    of `TF_CONFIG`, else rank 0 of `OMPI_COMM_WORLD_RANK`/`PMI_RANK`/`SLURM_PROCID`;
    `is_writer` overrides the detection. The other processes write nothing in
    `ckpt_directory`, not even ckpt.log.

    With `ckpt_signal` (USR1/USR2/TERM/INT, for a batch system's pre-emption warning)
    the callback handles that signal during fit: at the end of the running batch it
    stops, saves the last completed epoch if the interval skipped it (from a snapshot
    taken at that epoch's end), logs it and exits with status 75 (see
    `candle_ckpt.core.run.preemption`). With `ckpt_walltime_margin` it also stops that way at
    an epoch end when the next epoch and a save would not finish before the job's end
    (`candle_ckpt.core.run.walltime`).

    With `ckpt_save_steps` it also saves step checkpoints inside an epoch, every N
    batches and when `ckpt_signal` comes (`TrainingSession.batch_end`). After
    `restart()` resumed one (`J["batch"]` > 0), the same fit call, with
    `initial_epoch=J["epoch"]`, starts at that batch: its first `J["batch"]` steps train
    nothing, the metrics' running state is restored and the data move past the trained
    batches (`candle_ckpt.keras.steps`).

    The writer holds an advisory lock on `ckpts/.lock` from the start of fit to its end
    (the kernel drops it if the process dies): a second job writing the same tree fails
    with a `WriterLockedError` naming the holder's pid, host and start time, in
    `restart()` (which checks the lock before reading anything, without taking it) or
    else in `on_train_begin`.

    A `ckpt_save_best_metric` that is a near miss of a metric the model reports is
    refused at the end of the first batch (Keras builds its metrics in the first step,
    so their names are not known in `on_train_begin`); any other name missing from
    the epoch's logs at the end of the first epoch that can be saved, before the save.

    With `ckpt_async`, the training thread only copies the state to host memory (one
    extra copy of weights and optimizer variables, checked against available memory
    before each save) and a background thread writes it; at most one save is in
    flight, its errors are raised at the next save or at the end of fit, and the end
    of fit waits for it.

    Args:
        gParameters: dict of parameters; every `ckpt_*` key is type-checked here, before
            anything is written, and `epochs` (the run's last epoch) is required.
            See `candle_ckpt.core.params.PARAMETERS` for every key, default and meaning.
        logger: "DEFAULT" logs to `<ckpt_directory>/ckpt.log` (and the console when
            verbose); a `logging.Logger` to use instead; None for no log.
        verbose: whether INFO messages also go to the console.
        is_writer: True/False to say whether this process writes the tree (Horovod:
            `hvd.rank() == 0`), or None (default) to detect it as described above.
    """

    def __init__(
        self,
        gParameters: Mapping[str, Any],
        logger: Any = "DEFAULT",
        verbose: bool = True,
        is_writer: bool | None = None,
    ) -> None:
        super().__init__()
        self.session = TrainingSession(
            gParameters, logger=logger, verbose=verbose, is_writer=is_writer
        )
        self.checkpointer = self.session.checkpointer
        self._progress_bar = False
        self._metrics_checked = False
        self._start = steps.AT_EPOCH_START

    def on_train_begin(self, logs: dict | None = None) -> None:
        # fit(verbose=1), or "auto" (1 here), redraws one line of stdout per batch; a
        # callback driven by hand, outside fit, has no params
        self._progress_bar = (self.params or {}).get("verbose") in (1, "auto")
        self._metrics_checked = False
        batches_per_epoch = (self.params or {}).get("steps")
        steps.check_steps_per_execution(self.model, self.session.settings["ckpt_save_steps"])
        # Before `deferred` wraps the train function, so that a deferred load comes first.
        self._start = steps.start_fit(self.model, batches_per_epoch)
        deferred.load_when_built(self.model)
        weights_only = self.session.settings["ckpt_save_weights_only"]
        self.session.begin(KerasAdapter(self.model, weights_only, batches_per_epoch))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        # This callback runs before Keras' ProgbarLogger, which ended the last epoch's line.
        set_progress_line_open(False)
        self.session.epoch_begin(epoch, batch=self._start.batch)
        steps.epoch_began(self.model)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._progress_bar:
            set_progress_line_open(True)
        if self._start.skipped(batch):
            return  # trained before the restart: fit resumes after it
        if not self._metrics_checked:
            # Keras 3 builds the compiled metrics in the first train step, so their
            # names are first known here, not in on_train_begin; validation reports
            # each of them again with a val_ prefix.
            self._metrics_checked = True
            names = list(logs or {})
            self.session.check_metric_names(
                names + [f"val_{name}" for name in names],
                "the metrics this model reports (val_* with validation data)",
            )
        self.session.batch_end(batch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._start = steps.AT_EPOCH_START
        self.session.epoch_end(epoch + 1, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        set_progress_line_open(False)  # ProgbarLogger ended the last epoch's line
        self.session.end()

    def report_final(self) -> None:
        """Log the epochs this run keeps (CANDLE's API; also done at the end of fit)."""
        self.checkpointer.report_final()
