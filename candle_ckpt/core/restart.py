"""The restart flow every adapter shares: validate, find, verify, agree, load, report.

`restart_run(gParameters, adapter)` is what `candle_ckpt.restart` (Keras) and
`CandleCkptPyTorch.restart` do: check every `ckpt_*` parameter, decide which process
writes (only the writer logs to ckpt.log), follow `ckpts/last` to a verified epoch
(`resume.find_checkpoint`), check that every process found the same one
(`writer.agree_on_checkpoint`), let the adapter load the verified bytes, and log what
was loaded. On any error nothing has been loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from .adapter import FrameworkAdapter, Restored
from .layout import CheckpointLayout
from .logs import console_logger, tree_logger
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
        ChecksumMismatchError: as their names say; each message names the path.
    """
    settings = validate_params(gParameters)
    if settings["ckpt_restart_mode"] == "off":
        return None
    layout = CheckpointLayout(settings["ckpt_directory"])
    if adapter.writer_decision(is_writer).is_writer:
        logger = tree_logger("restart", layout, verbose)
    else:
        logger = console_logger("restart", verbose)
    started = time.perf_counter()
    checkpoint = agree_on_checkpoint(adapter.all_gather(),
                                     lambda: find_checkpoint(layout, settings, logger))
    if checkpoint is None:
        return None
    restored = adapter.restore(checkpoint, logger)
    if restored.deferred:
        logger.info("restart from epoch %d: %s verified (%d bytes in %.3f s), load "
                    "deferred: %s", checkpoint.epoch, checkpoint.model_path,
                    checkpoint.model_contents.nbytes, time.perf_counter() - started,
                    restored.source)
        return checkpoint.info
    log_restored(logger, checkpoint, restored, started)
    return checkpoint.info


def log_restored(logger: logging.Logger, checkpoint: Checkpoint, restored: Restored,
                 started: float, when: str = "") -> None:
    """Log what was loaded from `checkpoint` since `started` (`time.perf_counter`), and
    warn when it is not everything an exact resume needs. `when` notes a deferred load."""
    seconds = time.perf_counter() - started
    nbytes = checkpoint.model_contents.nbytes
    logger.info("restarted from epoch %d: loaded %s (%s%s) %d bytes in %.3f s (%.1f MB/s, "
                "reading and checks included)%s",
                checkpoint.epoch, checkpoint.model_path, ", ".join(restored.parts),
                f", {restored.source}" if restored.source else "",
                nbytes, seconds, nbytes / 1e6 / max(seconds, 1e-9),
                f", {when}" if when else "")
    if not restored.exact:
        logger.warning("epoch %d: no %s restored; training continues without it and will "
                       "not match an uninterrupted run", checkpoint.epoch, restored.missing)
