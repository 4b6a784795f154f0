"""The restart flow every adapter shares: validate, find, verify, agree, load, report.

`restart_run(gParameters, adapter)` is what `candle_ckpt.restart` (Keras) and
`CandleCkptPyTorch.restart` do: check every `ckpt_*` parameter, decide which process
writes (only the writer logs to ckpt.log), refuse a writer whose tree another job is
writing (`lock.WriterLock.check_free`, before anything is read), follow `ckpts/last`
to a verified epoch (`resume.find_checkpoint`), check that every process found the same one
(`writer.agree_on_checkpoint`), let the adapter load the verified bytes, and log what
was loaded. On any error nothing has been loaded, and a writer logs the refusal (with
its remedy) to ckpt.log.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from .adapter import FrameworkAdapter
from .errors import CheckpointError
from .layout import CheckpointLayout
from .lock import WriterLock
from .logs import console_logger, log_to_file_only, tree_logger
from .params import validate_params
from .resume import Checkpoint, find_checkpoint
from .writer import agree_on_checkpoint


def restart_run(gParameters: Mapping[str, Any], adapter: FrameworkAdapter, *,
                verbose: bool = True, is_writer: bool | None = None) -> dict | None:
    """Load the checkpoint `ckpts/last` names through `adapter`, if the mode asks for it.

    Modes (`ckpt_restart_mode`):
        off: return None and touch nothing.
        auto: no `last`, or a dangling one: log it and return None.
        required: no usable `last`: raise NoCheckpointError naming the path.

    Returns:
        The ckpt-info.json dict resumed from (`J["epoch"]`: the epochs completed), or
        None when there is nothing to restart from.

    Raises:
        ParameterTypeError / ParameterValueError: a bad parameter.
        NoCheckpointError, LinkError, CheckpointFormatError, CorruptCheckpointError,
        ChecksumMismatchError: as their names say; each message names the path and
            the remedy (fallback, rollback, verify).
        WriterLockedError: another job writes the tree (names its pid and host).
    """
    settings = validate_params(gParameters)
    if settings["ckpt_restart_mode"] == "off":
        return None
    layout = CheckpointLayout(settings["ckpt_directory"])
    writer = adapter.writer_decision(is_writer).is_writer
    if writer:
        logger = tree_logger("restart", layout, verbose)
    else:
        logger = console_logger("restart", verbose)
    will_lock = writer and settings["ckpt_save_interval"] > 0

    def find() -> Checkpoint | None:
        if will_lock:  # a second job is refused before it reads anything
            WriterLock(layout.ckpts, logger).check_free()
        return find_checkpoint(layout, settings, logger)

    started = time.perf_counter()
    try:
        checkpoint = agree_on_checkpoint(adapter.all_gather(), find)
        if checkpoint is None:
            return None
        restored = adapter.restore(checkpoint, logger)
    except CheckpointError as error:
        if writer:  # the console gets the error itself, from whoever catches it
            log_to_file_only(logger, logging.ERROR, "RESTART REFUSED: %s", error)
        raise
    seconds = time.perf_counter() - started
    nbytes = checkpoint.verified_nbytes
    logger.info("restarted from epoch %d: read and %s %d bytes (%s), loaded %s (%s%s) "
                "in %.3f s (%.1f MB/s)", checkpoint.epoch,
                "verified" if checkpoint.checksummed else "size-checked", nbytes,
                ", ".join(os.path.basename(path) for path in checkpoint.verified_files),
                checkpoint.model_path, ", ".join(restored.parts),
                f", {restored.source}" if restored.source else "",
                seconds, nbytes / 1e6 / max(seconds, 1e-9))
    if not restored.exact:
        logger.warning("epoch %d: no %s restored; training continues without it and will "
                       "not match an uninterrupted run", checkpoint.epoch, restored.missing)
    return checkpoint.info
