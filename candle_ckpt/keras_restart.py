"""restart(gParameters, model): resume a Keras model from the checkpoint `last` names."""

import time

from . import keras_h5
from .layout import CheckpointLayout
from .distributed import (agree_on_checkpoint, multi_worker_strategy, strategy_scope,
                          writer_decision)
from .logs import console_logger, tree_logger
from .params import validate_params
from .resume import find_checkpoint


def restart(gParameters, model, verbose=True, is_writer=None):
    """Load the checkpoint `ckpts/last` points at into `model`, if the mode asks for it.

    Call it after building and compiling the model and before `model.fit`; pass
    `initial_epoch=J["epoch"]` to fit and create `CandleCheckpointCallback` after it,
    so that the run continues exactly where the checkpoint left off::

        J = candle_ckpt.restart(params, model)
        initial_epoch = J["epoch"] if J else 0

    Modes (`ckpt_restart_mode`):
        off: return None and touch nothing.
        auto: no `last`, or a dangling one: log it and return None.
        required: no usable `last`: raise NoCheckpointError naming the path.

    The ckpt-info.json is validated, every file's CRC32 verified (`ckpt_checksum`),
    and only then are the weights, the optimizer state (unless the checkpoint is
    weights-only) and the RNG state loaded. On any error the model is left untouched.
    With `ckpt_restart_fallback`, a corrupt `last` is skipped for the newest earlier
    epoch that verifies.

    Several processes: every worker calls restart. Only the writer (see
    `candle_ckpt.distributed`) logs to ckpt.log; the others log to the console. Under
    a multi-worker `tf.distribute` strategy the workers check, with a collective, that
    they all found the same epoch and model CRC32, and all raise CheckpointError
    otherwise, before loading anything.

    Args:
        gParameters: the parameter dict (every `ckpt_*` key is checked first).
        model: a built and compiled Keras model of the same architecture.
        verbose: log INFO to the console too (everything goes to ckpt.log).
        is_writer: as for `CandleCheckpointCallback`: True/False, or None to detect.

    Returns:
        The ckpt-info.json dict resumed from (J["epoch"] is the next initial_epoch), or
        None when there is nothing to restart from.

    Raises:
        ParameterTypeError / ParameterValueError: a bad parameter.
        NoCheckpointError, LinkError, CheckpointFormatError, CorruptCheckpointError,
        ChecksumMismatchError: as their names say; each message names the path.
    """
    settings = validate_params(gParameters)
    if settings["ckpt_restart_mode"] == "off":
        return None
    layout = CheckpointLayout(settings["ckpt_directory"])
    if writer_decision(model, is_writer).is_writer:
        logger = tree_logger("restart", layout, verbose)
    else:
        logger = console_logger("restart", verbose)
    started = time.perf_counter()
    checkpoint = agree_on_checkpoint(multi_worker_strategy(model),
                                     lambda: find_checkpoint(layout, settings, logger))
    if checkpoint is None:
        return None
    with strategy_scope(model):
        loaded = keras_h5.restore(model, checkpoint.model_path,
                                  contents=checkpoint.model_contents, logger=logger)
    seconds = time.perf_counter() - started
    logger.info("restarted from epoch %d: loaded %s (%s%s%s) %d bytes in %.3f s (%.1f MB/s, "
                "reading and checks included)",
                checkpoint.epoch, checkpoint.model_path,
                "weights" if not loaded["optimizer_restored"] else "weights, optimizer",
                ", RNG" if loaded["rng_restored"] else "",
                ", legacy upstream-CANDLE file" if loaded["legacy"] else "",
                loaded["nbytes"], seconds, loaded["nbytes"] / 1e6 / max(seconds, 1e-9))
    if not loaded["optimizer_restored"]:
        logger.warning("epoch %d: no optimizer state restored; training continues from the "
                       "weights only and will not match an uninterrupted run", checkpoint.epoch)
    return checkpoint.info
