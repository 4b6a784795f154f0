"""CandleCheckpointCallback: save a crash-consistent checkpoint at the end of epochs."""

import os
import platform

import h5py
import keras
import numpy

from . import keras_h5
from .background import check_snapshot_fits
from .checkpointer import Checkpointer
from .distributed import check_is_writer, multi_worker_strategy, writer_decision
from .durable import WritebackStarter
from .errors import NoCheckpointError, ParameterValueError
from .logs import console_logger
from .preemption import PreemptionWatch
from .resume import read_epoch_info


def _library_versions():
    versions = {"keras": keras.__version__, "h5py": h5py.__version__,
                "numpy": numpy.__version__, "backend": keras.backend.backend()}
    if versions["backend"] == "tensorflow":
        import tensorflow
        versions["tensorflow"] = tensorflow.__version__
    versions["platform"] = platform.platform()
    return versions


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

    When fit starts at `initial_epoch > 0`, the callback reads that epoch's
    ckpt-info.json and continues its best-metric state, best epoch, keep-policy list
    and save times; epochs after it (a timeline abandoned by a rollback) are replaced as
    training reaches them.

    In a multi-process job only one process writes (see `candle_ckpt.distributed`):
    by default the chief of a `MultiWorkerMirroredStrategy`, else the chief or worker 0
    of `TF_CONFIG`, else rank 0 of `OMPI_COMM_WORLD_RANK`/`PMI_RANK`/`SLURM_PROCID`;
    `is_writer` overrides the detection. The other processes write nothing in
    `ckpt_directory`, not even ckpt.log.

    With `ckpt_signal` (USR1/USR2/TERM/INT, for a batch system's pre-emption warning)
    the callback handles that signal during fit: at the end of the running batch it
    stops, saves the last completed epoch if the interval skipped it (from a snapshot
    taken at that epoch's end), logs it and exits with status 75 (see
    `candle_ckpt.preemption`).

    The writer holds an advisory lock on `ckpts/.lock` from the start of fit to its end
    (the kernel drops it if the process dies): a second job writing the same tree fails
    in `on_train_begin` with a `WriterLockedError` naming the holder's pid, host and
    start time. `restart()` does not take it.

    With `ckpt_async`, the training thread only copies the state to host memory (one
    extra copy of weights and optimizer variables, checked against available memory
    before each save) and a background thread writes it; at most one save is in
    flight, its errors are raised at the next save or at the end of fit, and the end
    of fit waits for it.

    Args:
        gParameters: dict of parameters; every `ckpt_*` key is type-checked here, before
            anything is written, and `epochs` (the run's last epoch) is required.
            See `candle_ckpt.params.PARAMETERS` for every key, default and meaning.
        logger: "DEFAULT" logs to `<ckpt_directory>/ckpt.log` (and the console when
            verbose); a `logging.Logger` to use instead; None for no log.
        verbose: whether INFO messages also go to the console.
        is_writer: True/False to say whether this process writes the tree (Horovod:
            `hvd.rank() == 0`), or None (default) to detect it as described above.
    """

    def __init__(self, gParameters, logger="DEFAULT", verbose=True, is_writer=None):
        super().__init__()
        self.checkpointer = Checkpointer(gParameters, logger=logger, verbose=verbose,
                                         versions=_library_versions())
        self.weights_only = self.checkpointer.settings["ckpt_save_weights_only"]
        self._explicit_writer = check_is_writer(is_writer)
        self._writer = None
        self._verbose = verbose
        self._first_epoch_seen = False
        self._watch = None
        self._epoch = 0
        self._async_snapshot = self._held_snapshot = None  # reused copies (see _capture)

    def on_train_begin(self, logs=None):
        if self._is_writer():
            self.checkpointer.start_writing()
        self._watch = self._start_preemption_watch()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1
        if not self._first_epoch_seen:
            self._first_epoch_seen = True
            if self._watch is not None:
                self._watch.completed_epoch = epoch
            if epoch > 0 and self._is_writer():
                self._resume(epoch)

    def on_train_batch_end(self, batch, logs=None):
        if self._watch is not None and self._watch.requested:
            raise self._stop_preempted(f"epoch {self._epoch}, batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        decision = None
        if self._is_writer():
            decision = self.checkpointer.decide(epoch + 1, logs)
            if decision is not None:
                self.checkpointer.save(decision, self._capture)
        if self._watch is not None:
            self._watch.epoch_completed(
                epoch + 1, saved=decision is not None or self._not_saving() is not None,
                take_snapshot=lambda: (self.checkpointer.decision_now(epoch + 1, "pre-emption"),
                                       self._capture_held()))
            if self._watch.requested:
                raise self._stop_preempted(f"epoch {epoch + 1}")

    def on_train_end(self, logs=None):
        if self._watch is not None:
            self._watch.uninstall()
        if self._is_writer():
            self.checkpointer.finish()

    def report_final(self):
        """Log the epochs this run keeps (CANDLE's API; also done at the end of fit)."""
        self.checkpointer.report_final()

    def _resume(self, initial_epoch):
        """Continue the run whose checkpoint of `initial_epoch` restart() loaded."""
        layout = self.checkpointer.layout
        try:
            info = read_epoch_info(layout, initial_epoch)
        except NoCheckpointError:
            self.checkpointer.logger.warning(
                "fit starts at epoch %d but '%s' has no checkpoint: best-metric and keep "
                "state start afresh", initial_epoch + 1, layout.epoch_dir(initial_epoch))
            return
        self.checkpointer.resume(info)

    def _is_writer(self):
        """Whether this process writes the tree; decided once, when first asked."""
        if self._writer is None:
            decision = writer_decision(self.model, self._explicit_writer)
            self._writer = decision.is_writer
            if not decision.is_writer:
                console_logger("save", self._verbose).info(
                    "not the checkpoint writer (%s): this process writes nothing in '%s'",
                    decision.reason, self.checkpointer.layout.root)
        return self._writer

    def _capture(self):
        """Snapshot the state for a save now (training thread); return its writer.

        A synchronous save is written at once, before training goes on: its snapshot
        is made of views of the variables and costs neither a copy nor memory. With
        ckpt_async it is written while training goes on, so it is a copy in host
        memory, made into the previous save's (written by then: `Checkpointer.save`
        waits for it), so that the memory is allocated once per run.
        """
        if self.checkpointer.background is None:
            return files_writer(keras_h5.snapshot(self.model, self.weights_only, copy=False))
        self._async_snapshot = self._copy_state(self._async_snapshot, "ckpt_async=true",
                                                "ckpt_async=false")
        return files_writer(self._async_snapshot)

    def _capture_held(self):
        """Copy the state (training thread) for a save pre-emption may ask for later."""
        signal = self.checkpointer.settings["ckpt_signal"]
        self._held_snapshot = self._copy_state(self._held_snapshot, f"ckpt_signal={signal}",
                                               "ckpt_signal=off")
        return files_writer(self._held_snapshot)

    def _copy_state(self, spare, setting, off):
        """A host-memory copy of the state, into `spare` (a snapshot no longer needed);
        the first one is checked to fit in memory (`check_snapshot_fits`)."""
        if spare is None:
            check_snapshot_fits(keras_h5.state_nbytes(self.model, self.weights_only),
                                setting, off)
        return keras_h5.snapshot(self.model, self.weights_only, into=spare)

    # -- pre-emption (ckpt_signal) ----------------------------------------------------

    def _start_preemption_watch(self):
        name = self.checkpointer.settings["ckpt_signal"]
        if name == "off":
            return None
        if multi_worker_strategy(self.model) is not None:
            raise ParameterValueError(
                f"parameter 'ckpt_signal' is {name!r} under a multi-worker tf.distribute "
                f"strategy; expected 'off': workers could stop at different batches and "
                f"wait for each other forever")
        watch = PreemptionWatch(name)
        watch.install()
        return watch

    def _not_saving(self):
        """Why this process saves nothing at all, or None if it saves."""
        if not self._is_writer():
            return "this process does not write the checkpoint tree"
        if self.checkpointer.settings["ckpt_save_interval"] == 0:
            return "ckpt_save_interval is 0"
        return None

    def _stop_preempted(self, where):
        if not self._is_writer():
            return self._watch.stop(where, self._not_saving(), console_logger("save"))
        self._wait_for_saves()

        def save_pending(epoch, pending):
            decision, write_files = pending
            self.checkpointer.save(decision, lambda: write_files)
            self._wait_for_saves()
        return self._watch.stop(where, self._not_saving() or save_pending,
                                self.checkpointer.logger)

    def _wait_for_saves(self):
        """With ckpt_async: wait for the save in flight (raising its error)."""
        if self.checkpointer.background is not None:
            self.checkpointer.background.wait()


def files_writer(state):
    """The save protocol's write_files(directory): writes `state` as model.h5 there."""
    def write_files(directory):
        path = os.path.join(directory, keras_h5.MODEL_FILE)
        keras_h5.write(state, path, progress=WritebackStarter(path))
        return keras_h5.MODEL_FILE
    return write_files
