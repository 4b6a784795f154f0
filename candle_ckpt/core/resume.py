"""Which checkpoint a restart loads, verified, without any framework.

`find_checkpoint` follows `ckpts/last` (or wherever an operator relinked it), reads and
validates its ckpt-info.json and verifies every file it lists. With
`ckpt_restart_fallback`, a corrupt `last` is skipped (loudly) for the newest earlier
epoch that verifies. The model file is read once, while it is verified; the framework
adapter then loads those bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError, NoCheckpointError
from .info import finite_or_none, is_legacy
from .layout import CheckpointLayout
from .logs import LibraryLogger
from .verify import check_epoch, read_epoch_info

__all__ = ["Checkpoint", "find_checkpoint", "legacy_best_epoch", "load_verified",
           "read_epoch_info"]  # read_epoch_info: verify.py owns it; imported from here too


@dataclass(frozen=True)
class Checkpoint:
    """A verified epoch directory: its epoch, path, ckpt-info dict and model file path.

    `model_contents` holds the model file's bytes as they were verified (a read-only
    memoryview): loading them, rather than reading the file again, means that what is
    loaded is exactly what was verified, and the file is read only once.
    """
    epoch: int
    directory: str
    info: dict[str, Any]
    model_contents: memoryview = field(repr=False, compare=False)

    @property
    def model_path(self) -> str:
        return os.path.join(self.directory, self.info["model_file"])


def legacy_best_epoch(layout: CheckpointLayout, info: dict[str, Any]) -> int | None:
    """The best epoch of an upstream CANDLE run, at or before the epoch of `info`.

    Upstream CANDLE records only `best_metric_last`, the best value so far, and saves
    every improvement: the best epoch is the first epoch on disk, up to `info`'s, whose
    ckpt-info.json records that metric and value. None when no metric is tracked or no
    such epoch is on disk (an epoch whose ckpt-info.json is unreadable is passed over).
    """
    metric, value = info["save_best_metric"], finite_or_none(info["best_metric_last"])
    if metric is None or value is None:
        return None
    for earlier in layout.list_epochs():
        if earlier > info["epoch"]:
            break
        try:
            candidate = info if earlier == info["epoch"] else read_epoch_info(layout, earlier)
        except CheckpointError:
            continue
        if (candidate["save_best_metric"] == metric
                and finite_or_none(candidate["best_metric_last"]) == value):
            return earlier
    return None


def load_verified(layout: CheckpointLayout, epoch: int, verify_checksums: bool,
                  logger: LibraryLogger) -> Checkpoint:
    """Read and verify epoch `epoch`; return a `Checkpoint` or raise a CheckpointError."""
    check = check_epoch(layout, epoch, verify_checksums=verify_checksums,
                        hold_model_contents=True)
    check.raise_if_bad()
    info, results = check.info, check.files
    unverified = [r.path for r in results if r.expected_crc32 is None]
    if verify_checksums and unverified:
        logger.warning("checkpoint of epoch %d was written without checksums: %s not "
                       "verified", epoch, ", ".join(unverified))
    if is_legacy(info):
        logger.info("epoch %d is a legacy (upstream CANDLE) checkpoint", epoch)
    model_contents = next(r.contents for r in results if r.contents is not None)
    return Checkpoint(epoch, layout.epoch_dir(epoch), info, model_contents)


def find_checkpoint(layout: CheckpointLayout, settings: Mapping[str, Any],
                    logger: LibraryLogger) -> Checkpoint | None:
    """The verified checkpoint a restart should load, or None to start from scratch.

    Args:
        layout: the tree.
        settings: validated parameters (restart mode, checksum, fallback).
        logger: where to log what was found and why.

    Raises:
        NoCheckpointError: mode "required" and no usable `last`.
        CheckpointError: `last` is invalid or corrupt (and fallback is off or finds
            nothing that verifies).
    """
    mode = settings["ckpt_restart_mode"]
    epoch = layout.resolve_link("last")
    if epoch is None:
        link = layout.link("last")
        state = "dangling" if os.path.lexists(link) else "absent"
        if mode == "required":
            raise NoCheckpointError(f"ckpt_restart_mode is 'required' but '{link}' is "
                                    f"{state}; expected a link to a saved epoch")
        logger.info("no checkpoint to restart from ('%s' is %s): starting from scratch",
                    link, state)
        return None
    verify_checksums = settings["ckpt_checksum"]
    try:
        return load_verified(layout, epoch, verify_checksums, logger)
    except CheckpointError as error:
        if not settings["ckpt_restart_fallback"]:
            raise
        logger.error("CHECKPOINT OF EPOCH %d IS UNUSABLE: %s", epoch, error)
        for earlier in reversed([e for e in layout.list_epochs() if e < epoch]):
            try:
                found = load_verified(layout, earlier, verify_checksums, logger)
            except CheckpointError as skipped:
                logger.error("skipping epoch %d as well: %s", earlier, skipped)
                continue
            logger.error("FALLING BACK to epoch %d (ckpt_restart_fallback=true); epoch %d "
                         "was skipped", earlier, epoch)
            return found
        raise CheckpointError(f"'{layout.link('last')}' (epoch {epoch}) is unusable ({error}) "
                              f"and no earlier epoch verifies; nothing to fall back to") from error
