"""CandleCheckpointCallback: save a crash-consistent checkpoint at the end of epochs."""

import os
import platform

import h5py
import keras
import numpy

from . import keras_h5
from .background import check_snapshot_fits
from .checkpointer import Checkpointer
from .durable import WritebackStarter
from .info import read_info


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
    training reaches them. Under a `tf.distribute` strategy only the worker that should
    checkpoint (the chief) writes.

    With `ckpt_async`, the training thread only copies the state to host memory (one
    extra copy of weights and optimizer variables, checked against available memory
    before each save) and a background thread writes it; at most one save is in
    flight, its errors are raised at the next save or at the end of fit, and the end
    of fit waits for it.

    The writer holds an advisory lock on `ckpts/.lock` from the start of fit to its end
    (the kernel drops it if the process dies): a second job writing the same tree fails
    in `on_train_begin` with a `WriterLockedError` naming the holder's pid, host and
    start time. `restart()` does not take it.

    Args:
        gParameters: dict of parameters; every `ckpt_*` key is type-checked here, before
            anything is written, and `epochs` (the run's last epoch) is required.
            See `candle_ckpt.params.PARAMETERS` for every key, default and meaning.
        logger: "DEFAULT" logs to `<ckpt_directory>/ckpt.log` (and the console when
            verbose); a `logging.Logger` to use instead; None for no log.
        verbose: whether INFO messages also go to the console.
    """

    def __init__(self, gParameters, logger="DEFAULT", verbose=True):
        super().__init__()
        self.checkpointer = Checkpointer(gParameters, logger=logger, verbose=verbose,
                                         versions=_library_versions())
        self.weights_only = self.checkpointer.settings["ckpt_save_weights_only"]
        self._first_epoch_seen = False

    def on_train_begin(self, logs=None):
        if self._is_writer():
            self.checkpointer.start_writing()

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch_seen:
            self._first_epoch_seen = True
            if epoch > 0:
                self._resume(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if not self._is_writer():
            return
        decision = self.checkpointer.decide(epoch + 1, logs)
        if decision is not None:
            self.checkpointer.save(decision, self._capture)

    def on_train_end(self, logs=None):
        if self._is_writer():
            self.checkpointer.finish()

    def report_final(self):
        """Log the epochs this run keeps (CANDLE's API; also done at the end of fit)."""
        self.checkpointer.report_final()

    def _resume(self, initial_epoch):
        """Continue the run whose checkpoint of `initial_epoch` restart() loaded."""
        directory = self.checkpointer.layout.epoch_dir(initial_epoch)
        try:
            info = read_info(directory)
        except FileNotFoundError:
            self.checkpointer.logger.warning(
                "fit starts at epoch %d but '%s' has no checkpoint: best-metric and keep "
                "state start afresh", initial_epoch + 1, directory)
            return
        self.checkpointer.resume(info)

    def _is_writer(self):
        strategy = getattr(self.model, "distribute_strategy", None)
        return getattr(getattr(strategy, "extended", None), "should_checkpoint", True)

    def _capture(self):
        """Snapshot the state now (training thread); return the function that writes it."""
        if self.checkpointer.background is not None:
            check_snapshot_fits(keras_h5.state_nbytes(self.model, self.weights_only))
        state = keras_h5.snapshot(self.model, weights_only=self.weights_only)

        def write_files(directory):
            path = os.path.join(directory, keras_h5.MODEL_FILE)
            keras_h5.write(state, path, progress=WritebackStarter(path))
            return keras_h5.MODEL_FILE
        return write_files
