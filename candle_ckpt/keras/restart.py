"""restart(gParameters, model): resume a Keras model from the checkpoint `last` names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.params import validate_params
from ..core.restore.restart import restart_run
from ..hdf5_check import prestart
from .adapter import KerasAdapter


def restart(
    gParameters: Mapping[str, Any], model: Any, verbose: bool = True, is_writer: bool | None = None
) -> dict | None:
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
    weights-only) and the RNG state loaded. On any error the model is left untouched,
    but for one: the large arrays are read straight into the model's variables once the
    file's CRC32 has verified, from a second read of it that is checksummed too; a file
    that changes between the two (a checkpoint file is never rewritten) is refused with
    an error saying that the model's values are partly overwritten. With
    `ckpt_restart_fallback`, the earlier epoch then loaded overwrites them all.
    With `ckpt_restart_fallback`, a corrupt `last` is skipped for the newest earlier
    epoch that verifies.

    Warm start (`ckpt_init_from`): when there is no checkpoint of the run's own, the
    weights only (no optimizer, no RNG state) are loaded from that verified checkpoint
    and None is returned, so training starts at epoch 0.

    A model that is not built yet (a subclassed `keras.Model` whose layers create their
    variables at its first call) cannot take the state now: the checkpoint is verified
    and its info returned as always, and `CandleCheckpointCallback` loads the verified
    bytes once fit has built the model, before the first training step
    (`candle_ckpt.keras.deferred`); the restart log says so at both points. Pass the
    callback to fit, or build the model first (call it on one batch).

    Several processes: every worker calls restart. Only the writer (see
    `candle_ckpt.core.run.writer`) logs to ckpt.log; the others log to the console. Under
    a multi-worker `tf.distribute` strategy the workers check, with a collective, that
    they all found the same epoch and model CRC32, and all raise CheckpointError
    otherwise, before loading anything.

    Args:
        gParameters: the parameter dict (every `ckpt_*` key is checked first).
        model: a compiled Keras model of the same architecture (built, or built by
            fit with CandleCheckpointCallback, see above).
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
    if settings["ckpt_restart_mode"] != "off" or settings["ckpt_init_from"] is not None:
        # The checker process of the model file (`hdf5_check`) starts in a new job's
        # process while the checkpoint is found and verified, rather than after.
        prestart()
    return restart_run(gParameters, KerasAdapter(model), verbose=verbose, is_writer=is_writer)
