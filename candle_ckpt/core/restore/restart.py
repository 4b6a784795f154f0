"""The restart flow every adapter shares: validate, find, verify, agree, load, report.

`restart_run(gParameters, adapter)` is what `candle_ckpt.restart` (Keras) and
`CandleCkptPyTorch.restart` do: check every `ckpt_*` parameter, decide which process
writes (only the writer logs to ckpt.log), refuse a writer whose tree another job is
writing (`lock.WriterLock.check_free`, before anything is read), follow `ckpts/last`
to a verified epoch (`resume.find_checkpoint`), check that every process found the same one
(`writer.agree_on_checkpoint`), let the adapter load the verified bytes, and log what
was loaded. On any error nothing has been loaded (but for a model file that changed
after it verified, read into the model by `adapter.read_model_into`: the error says
so), and a writer logs the refusal (with its remedy) to ckpt.log.

A run with no checkpoint of its own and `ckpt_init_from` set is warm-started: the model
weights only are loaded from that verified checkpoint (`warm_start`), and where they
came from is kept for the run's `Checkpointer` (`take_warm_start`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from ..adapter import FrameworkAdapter, Restored
from ..errors import CheckpointError, CheckpointFormatError
from ..format.layout import CheckpointLayout
from ..format.locate import run_layout
from ..logs import LibraryLogger, console_logger, log_to_file_only, tree_logger
from ..params import validate_params
from ..run.lock import WriterLock
from ..run.writer import agree_on_checkpoint
from ..storage import tree_fs
from .resume import Checkpoint, find_checkpoint, find_init_checkpoint

# ckpt_directory (absolute) -> the provenance of the warm start restart_run did for it,
# until the run's TrainingSession takes it (a restart and its training share a process).
_warm_starts: dict[str, dict[str, Any]] = {}


# ckpt_directory (absolute) -> the (epoch, batch) restart_run restored for it, until
# the run's TrainingSession takes it: training must then begin right there.
_restored_epochs: dict[str, tuple[int, int]] = {}


def take_warm_start(layout: CheckpointLayout) -> dict[str, Any] | None:
    """The warm start's provenance ({"source", "epoch", "checksum"}) of the run writing
    `layout`, if its restart warm-started the model, else None; taken once."""
    return _warm_starts.pop(layout.root, None)


def take_restored_epoch(layout: CheckpointLayout) -> tuple[int, int] | None:
    """(epochs completed, batches done in the next) a restart in this process restored
    into the run writing `layout`, or None; taken once."""
    return _restored_epochs.pop(layout.root, None)


def restart_run(
    gParameters: Mapping[str, Any],
    adapter: FrameworkAdapter,
    *,
    verbose: bool = True,
    is_writer: bool | None = None,
) -> dict | None:
    """Load the checkpoint `ckpts/last` names through `adapter`, if the mode asks for it.

    Modes (`ckpt_restart_mode`):
        off: return None and touch nothing.
        auto: no `last`, or a dangling one: log it and return None.
        required: no usable `last`: raise NoCheckpointError naming the path.

    With no checkpoint of the run's own (mode off, or auto without `last`) and
    `ckpt_init_from` set, the model weights are initialised from that source
    (`warm_start`) and None is returned: the run starts at epoch 0.

    Returns:
        The ckpt-info.json dict resumed from, or None when there is nothing to restart
        from. `J["epoch"]`: the epochs completed; `J["batch"]`: the batches of the
        next epoch already trained (a step checkpoint's; 0, and added, for an epoch's).

    Raises:
        ParameterTypeError / ParameterValueError: a bad parameter (a ckpt_directory
            that is a file among them).
        NoCheckpointError, LinkError, CheckpointFormatError, CorruptCheckpointError,
        ChecksumMismatchError: as their names say; each message names the path and
            the remedy (fallback, rollback, verify).
        WriterLockedError: another job writes the tree (names its pid and host).
        UnsafePathError: a path the job would write is a link or of the wrong kind.
    """
    settings = validate_params(gParameters)
    init_from = settings["ckpt_init_from"]
    if settings["ckpt_restart_mode"] == "off" and init_from is None:
        return None
    layout = run_layout(settings)
    _warm_starts.pop(layout.root, None)
    _restored_epochs.pop(layout.root, None)
    writer = adapter.writer_decision(is_writer).is_writer
    if writer:
        logger = tree_logger("restart", layout, verbose)
    else:
        logger = console_logger("restart", verbose)
    will_lock = writer and settings["ckpt_save_interval"] > 0
    gather = adapter.all_gather()
    # One process reads the model file's arrays straight into the model; processes that
    # must first agree on the checkpoint load nothing before they have.
    read_into = adapter.read_model_into() if gather is None else None

    def find() -> Checkpoint | None:
        if will_lock:  # a second job, or a tree it cannot write, before it reads anything
            tree_fs.refuse_unsafe_tree(layout)
            WriterLock(layout.ckpts, logger).check_free()
        return find_checkpoint(layout, settings, logger, read_into)

    started = time.perf_counter()
    try:
        checkpoint = None
        if settings["ckpt_restart_mode"] != "off":
            checkpoint = agree_on_checkpoint(gather, find)
        if checkpoint is None:
            if init_from is not None:
                _warm_starts[layout.root] = warm_start(init_from, adapter, logger)
            return None
        if init_from is not None:
            logger.info(
                "the run restarts from its own checkpoint (epoch %d): "
                "ckpt_init_from %r is ignored (it initialises only a run with no "
                "checkpoint yet)",
                checkpoint.epoch,
                init_from,
            )
        restored = adapter.restore(checkpoint, logger)
    except CheckpointError as error:
        if writer:  # the console gets the error itself, from whoever catches it
            log_to_file_only(logger, logging.ERROR, "RESTART REFUSED: %s", error)
        raise
    _restored_epochs[layout.root] = (checkpoint.epoch, checkpoint.batch)
    J = {**checkpoint.info, "batch": checkpoint.batch}
    if restored.deferred:
        logger.info(
            "restart from %s: read and %s %d bytes (%s), load deferred: %s",
            checkpoint.describe(),
            _how_checked(checkpoint),
            checkpoint.verified_nbytes,
            _file_names(checkpoint),
            restored.source,
        )
        return J
    log_restored(logger, checkpoint, restored, started)
    return J


def _how_checked(checkpoint: Checkpoint) -> str:
    return "verified" if checkpoint.checksummed else "size-checked"


def _file_names(checkpoint: Checkpoint) -> str:
    return ", ".join(os.path.basename(path) for path in checkpoint.verified_files)


def log_restored(
    logger: LibraryLogger,
    checkpoint: Checkpoint,
    restored: Restored,
    started: float,
    when: str = "",
) -> None:
    """Log what was loaded from `checkpoint` since `started` (`time.perf_counter`), and
    warn when it is not everything an exact resume needs. `when` notes a deferred load."""
    seconds = time.perf_counter() - started
    nbytes = checkpoint.verified_nbytes
    logger.info(
        "restarted from %s: read and %s %d bytes (%s), loaded %s (%s%s) in %.3f s (%.1f MB/s)%s",
        checkpoint.describe(),
        _how_checked(checkpoint),
        nbytes,
        _file_names(checkpoint),
        checkpoint.model_path,
        ", ".join(restored.parts),
        f", {restored.source}" if restored.source else "",
        seconds,
        nbytes / 1e6 / max(seconds, 1e-9),
        f", {when}" if when else "",
    )
    if not restored.exact:
        logger.warning(
            "%s: no %s restored; training continues without it and will "
            "not match an uninterrupted run",
            checkpoint.describe(),
            restored.missing,
        )


def warm_start(source: str, adapter: FrameworkAdapter, logger: LibraryLogger) -> dict[str, Any]:
    """Load the model weights only from the verified checkpoint `source` names.

    The optimizer, the epoch count and the random states start fresh: this is a new run
    initialised from another one's weights (`ckpt_init_from`). Every process loads the
    source itself; under a collective they first check that they all found the same
    checkpoint, as a restart does.

    Returns:
        The provenance {"source": the epoch directory, "epoch", "checksum": the model
        file's recorded CRC32}.

    Raises:
        CheckpointError: the source is missing, invalid or fails verification, or its
            weights do not fit the model; nothing was loaded.
    """
    started = time.perf_counter()
    checkpoint: Checkpoint | None = agree_on_checkpoint(
        adapter.all_gather(), lambda: find_init_checkpoint(source, logger)
    )
    assert checkpoint is not None  # find_init_checkpoint raises rather than find nothing
    try:
        restored = adapter.restore(checkpoint, logger, weights_only=True)
    except CheckpointFormatError as error:
        raise CheckpointFormatError(
            f"ckpt_init_from {source!r}: {error}. Nothing was loaded and training did not "
            f"start: the source must be a checkpoint of a model built like this one"
        ) from error
    logger.info(
        "WARM START from ckpt_init_from %r: loaded the weights (%s) of epoch %d "
        "from %s (CRC32-verified) in %.3f s; optimizer, epoch count and random "
        "states start fresh, training starts at epoch 1",
        source,
        ", ".join(restored.parts),
        checkpoint.epoch,
        checkpoint.model_path,
        time.perf_counter() - started,
    )
    return {
        "source": checkpoint.directory,
        "epoch": checkpoint.epoch,
        "checksum": str(checkpoint.info["checksum"]),
    }
