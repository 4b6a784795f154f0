"""Which checkpoint a restart loads, verified, without any framework.

`find_checkpoint` follows `ckpts/last` (or wherever an operator relinked it), reads and
validates its ckpt-info.json and verifies every file it lists. A step checkpoint
(`last_step`, inside the epoch after `last`'s) is taken instead while it continues the
checkpoint `last` names (its `after_last`: docs/FORMAT.md, "Step checkpoints"). With
`ckpt_restart_fallback`, a corrupt checkpoint is skipped (loudly) for the newest earlier
one that verifies, a step checkpoint or an epoch. The model file is read once, while it
is verified (mapped and checksummed first where its large arrays go straight into the
model, which is then read and checksummed as it is filled); the framework adapter then
loads those bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, LinkError, NoCheckpointError, add_remedy
from ..format.info import finite_or_none, is_legacy, read_info
from ..format.layout import INFO_FILE, CheckpointLayout
from ..format.locate import is_tree, locate
from ..format.steps import continues, last_identity
from ..logs import LibraryLogger
from ..storage.checksum import RegionPlanner
from .verify import FileCheck, check_epoch, read_epoch_info, verify_files

__all__ = [
    "Checkpoint",
    "find_checkpoint",
    "find_init_checkpoint",
    "legacy_best_epoch",
    "load_verified",
    "read_epoch_info",
    "verified_checkpoint",
]
# read_epoch_info: verify.py owns it; imported from here too


@dataclass(frozen=True)
class Checkpoint:
    """A verified epoch directory: its epoch, path, ckpt-info dict and model file path
    (a step checkpoint's: `batch` > 0, the batches done in epoch `epoch` + 1).

        `model_contents` holds the model file's bytes as they were verified (a read-only
        memoryview): loading them, rather than reading the file again, means that what is
        loaded is exactly what was verified, and the file is read only once.
    """

    epoch: int
    directory: str
    info: dict[str, Any]
    model_contents: memoryview = field(repr=False, compare=False)
    verified_files: tuple[str, ...] = ()
    """The paths of every file checked, the model file among them."""
    verified_nbytes: int = 0
    """Their sizes on disk, summed: the bytes read and checked."""
    checksummed: bool = False
    """Whether every one of them had its CRC32 recomputed (else size only)."""
    batch: int = 0
    """Batches completed in the running epoch (0: an epoch-end checkpoint)."""

    def describe(self) -> str:
        """ "epoch 3" (completed), or for a step checkpoint "epoch 3, batch 150" (150
        batches of epoch 3 done), as the save's log line says it."""
        if self.batch:
            return f"epoch {self.epoch + 1}, batch {self.batch}"
        return f"epoch {self.epoch}"

    @property
    def model_path(self) -> str:
        return os.path.join(self.directory, self.info["model_file"])


def legacy_best_epoch(layout: CheckpointLayout, info: Mapping[str, Any]) -> int | None:
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
        if (
            candidate["save_best_metric"] == metric
            and finite_or_none(candidate["best_metric_last"]) == value
        ):
            return earlier
    return None


def load_verified(
    layout: CheckpointLayout,
    epoch: int,
    verify_checksums: bool,
    logger: LibraryLogger,
    read_into: RegionPlanner | None = None,
    batch: int = 0,
) -> Checkpoint:
    """Read and verify epoch `epoch` (with `batch` > 0: that step checkpoint); return a
    `Checkpoint` or raise a CheckpointError.

    `read_into`: where the model file's large arrays are read instead of its contents
    (`checksum.read_file`), already while it is verified."""
    check = check_epoch(
        layout,
        epoch,
        verify_checksums=verify_checksums,
        hold_model_contents=True,
        read_into=read_into,
        batch=batch,
    )
    check.raise_if_bad()
    directory = layout.checkpoint_dir(epoch, batch)
    return _checkpoint(directory, check.info, check.files, verify_checksums, logger)


def verified_checkpoint(
    directory: str, info: dict[str, Any], verify_checksums: bool, logger: LibraryLogger
) -> Checkpoint:
    """Verify the files `info` (the validated ckpt-info dict of `directory`) lists and
    return the `Checkpoint`, its model file's verified bytes read once."""
    results = verify_files(directory, info, verify_checksums, hold_contents_of=info["model_file"])
    return _checkpoint(directory, info, results, verify_checksums, logger)


def _checkpoint(
    directory: str,
    info: dict[str, Any],
    results: list[FileCheck],
    verify_checksums: bool,
    logger: LibraryLogger,
) -> Checkpoint:
    """The `Checkpoint` of `directory` from its intact file checks (the model file's
    holding its bytes), after logging what was not verified."""
    epoch = info["epoch"]
    unverified = [r.path for r in results if r.expected_crc32 is None]
    if verify_checksums and unverified:
        logger.warning(
            "checkpoint of epoch %d was written without checksums: %s not verified",
            epoch,
            ", ".join(unverified),
        )
    if is_legacy(info):
        logger.info("epoch %d is a legacy (upstream CANDLE) checkpoint", epoch)
    model_contents = next(r.contents for r in results if r.contents is not None)
    return Checkpoint(
        epoch,
        directory,
        info,
        model_contents,
        verified_files=tuple(r.path for r in results),
        verified_nbytes=sum(r.actual_size or 0 for r in results),
        checksummed=verify_checksums and not unverified,
        batch=info.get("batch", 0),
    )


def find_checkpoint(
    layout: CheckpointLayout,
    settings: Mapping[str, Any],
    logger: LibraryLogger,
    read_into: RegionPlanner | None = None,
) -> Checkpoint | None:
    """The verified checkpoint a restart should load, or None to start from scratch.

    Args:
        layout: the tree.
        settings: validated parameters (restart mode, checksum, fallback).
        logger: where to log what was found and why.
        read_into: where each model file read has its large arrays read (the model's
            own memory: `FrameworkAdapter.read_model_into`), or None.

    Raises:
        NoCheckpointError: mode "required" and no usable `last`.
        CheckpointError: `last` is invalid or corrupt (and fallback is off or finds
            nothing that verifies).
    """
    mode = settings["ckpt_restart_mode"]
    try:
        epoch = layout.resolve_link("last")
    except LinkError as error:
        add_remedy(
            error,
            f"Point it at a saved epoch N with 'candle-ckpt rollback "
            f"{layout.root} N', which verifies N first "
            f"(ckpt_restart_fallback does not apply to a bad link)",
        )
        raise
    step = find_step_checkpoint(layout, settings, logger, epoch, read_into)
    if step is not None:
        return step
    if epoch is None:
        link = layout.link("last")
        state = "dangling" if os.path.lexists(link) else "absent"
        if mode == "required":
            raise NoCheckpointError(
                f"ckpt_restart_mode is 'required' but '{link}' is "
                f"{state}; expected a link to a saved epoch. Check "
                f"--ckpt_directory, or run with --ckpt_restart_mode "
                f"auto to start from scratch when there is none"
            )
        if state == "absent" and not layout.list_epochs():
            logger.info(
                "no checkpoint to restart from ('%s' is absent): starting from scratch", link
            )
        else:
            logger.warning(_from_scratch_message(layout))
        return None
    verify_checksums = settings["ckpt_checksum"]
    try:
        return load_verified(layout, epoch, verify_checksums, logger, read_into)
    except CheckpointError as error:
        if not settings["ckpt_restart_fallback"]:
            add_remedy(
                error,
                (
                    f"Remedies: rerun with --ckpt_restart_fallback true to restart from the "
                    f"newest earlier epoch that verifies, or choose one with 'candle-ckpt "
                    f"rollback {layout.root} N' ('candle-ckpt list --verify {layout.root}' "
                    f"shows which verify)"
                ),
            )
            raise
        logger.error("CHECKPOINT OF EPOCH %d IS UNUSABLE: %s", epoch, error)
        for earlier in reversed([e for e in layout.list_epochs() if e < epoch]):
            try:
                found = load_verified(layout, earlier, verify_checksums, logger, read_into)
            except CheckpointError as skipped:
                logger.error("skipping epoch %d as well: %s", earlier, skipped)
                continue
            logger.error(
                "FALLING BACK to epoch %d (ckpt_restart_fallback=true); epoch %d was skipped",
                earlier,
                epoch,
            )
            return found
        raise CheckpointError(
            f"'{layout.link('last')}' (epoch {epoch}) is unusable ({error}) and no earlier "
            f"epoch verifies; nothing to fall back to. 'candle-ckpt verify "
            f"{layout.root} --all' shows what is wrong with each epoch; to train "
            f"afresh, use another --ckpt_directory or --ckpt_restart_mode off"
        ) from error


def find_step_checkpoint(
    layout: CheckpointLayout,
    settings: Mapping[str, Any],
    logger: LibraryLogger,
    last: int | None,
    read_into: RegionPlanner | None = None,
) -> Checkpoint | None:
    """The verified step checkpoint that continues `last` (epoch `last`, or None when
    there is no usable `last`), or None: the restart then loads `last`.

    Step checkpoints are resumed only with `ckpt_save_steps` other than 0: it says
    that the training loop honours J["batch"] (skips the batches already trained).
    `last_step` names the newest step checkpoint. It continues `last` when its
    `after_last` records the epoch and ckpt-info.json CRC32 that `last` names now; it
    does not when a reader that knows nothing of step checkpoints (the previous
    release, candle_lib) saved an epoch or moved `last` since: then it is ignored, with
    a warning, and the run resumes from `last` as that reader left it. With
    `ckpt_restart_fallback` an unusable one is skipped for an older step checkpoint
    that continues `last` (a kill between a step save and the pruning of the one it
    superseded leaves one), then for `last` itself.

    Raises:
        LinkError: `last_step` is not a link to a step checkpoint directory.
        CheckpointError: the step checkpoint is invalid or corrupt, and fallback is off.
    """
    try:
        named = layout.resolve_step_link()
    except LinkError as error:
        add_remedy(
            error,
            f"Remove it ('rm {layout.link('last_step')}': the restart then resumes from "
            f"'last', at an epoch end) or point it at a directory of '{layout.steps}'",
        )
        raise
    if named is None:
        return None
    if settings["ckpt_save_steps"] == 0:
        logger.info(
            "step checkpoint '%s' is not resumed: ckpt_save_steps is 0 (the training "
            "loop resumes at epoch ends only); resuming from 'last', the epoch's batches "
            "done since are trained again",
            layout.step_dir(*named),
        )
        return None
    candidates = [named] + [s for s in reversed(layout.list_steps()) if s < named]
    identity = last_identity(layout)
    for position in candidates:
        where = layout.step_dir(*position)
        try:
            info = read_epoch_info(layout, *position)
            if not continues(info["after_last"], identity):
                logger.warning(
                    "step checkpoint '%s' continues the checkpoint of epoch %s, but 'last' "
                    "names %s now (saved or relinked by a release that knows no step "
                    "checkpoints, or a rollback): ignored; resuming from 'last'",
                    where,
                    info["after_last"]["epoch"],
                    "nothing" if last is None else f"epoch {last}",
                )
                return None
            return load_verified(
                layout, position[0], settings["ckpt_checksum"], logger, read_into, position[1]
            )
        except CheckpointError as error:
            if not settings["ckpt_restart_fallback"]:
                add_remedy(
                    error,
                    f"Remedies: rerun with --ckpt_restart_fallback true to restart from the "
                    f"newest earlier checkpoint that verifies, or remove "
                    f"'{layout.link('last_step')}' to resume from 'last' (the epoch's "
                    f"batches done since are then trained again)",
                )
                raise
            logger.error("STEP CHECKPOINT '%s' IS UNUSABLE: %s", where, error)
    logger.error(
        "FALLING BACK from the step checkpoints to 'last' (ckpt_restart_fallback=true): "
        "the batches of the epoch done since are trained again"
    )
    return None


def _from_scratch_message(layout: CheckpointLayout) -> str:
    """Why a run whose `last` is dangling, or absent beside saved epochs (a crash of
    upstream CANDLE between removing the link and making it again leaves that), starts
    from scratch, and how to continue one of those epochs instead."""
    link = layout.link("last")
    if os.path.lexists(link):
        target = os.readlink(link)
        why = (
            f"'{link}' -> '{target}' names '{os.path.join(os.path.dirname(link), target)}', "
            f"which does not exist (a dangling last means: start from scratch)"
        )
    else:
        why = f"'{link}' does not exist (no last means: start from scratch)"
    epochs = layout.list_epochs()
    remedy = (
        f"to continue epoch N instead, stop this run and point last at it with "
        f"'candle-ckpt rollback {layout.root} N' (it verifies N first)"
        if epochs
        else "there is no epoch to continue"
    )
    on_disk = ", ".join(map(str, epochs)) if epochs else "none"
    return f"STARTING FROM SCRATCH: {why}; epochs on disk: {on_disk}; {remedy}"


INIT_SELECTORS = ("last", "best")


def find_init_checkpoint(source: str, logger: LibraryLogger) -> Checkpoint:
    """The verified checkpoint `ckpt_init_from` names (a warm start's weights).

    `source` is a checkpoint tree (a `ckpt_directory`: its `last`), an epoch directory
    (one holding ckpt-info.json, e.g. `TREE/ckpts/epochs/005` or `TREE/ckpts/best`),
    or `TREE:last`, `TREE:best`, `TREE:EPOCH`. Every file is CRC32-verified, whatever
    this run's `ckpt_checksum`.

    Raises:
        CheckpointError: the source does not exist, is not a tree or an epoch
            directory, its link or epoch is missing, or it fails verification; the
            message names `ckpt_init_from`, the path and the remedy.
    """
    try:
        return _init_checkpoint(source, logger)
    except CheckpointError as error:
        raise CheckpointError(
            f"ckpt_init_from {source!r}: {error}. Nothing was loaded and training did not "
            f"start: give a checkpoint tree, an epoch directory or TREE:best|last|EPOCH "
            f"that verifies ('candle-ckpt list --verify TREE' shows which epochs do)"
        ) from error


def _init_checkpoint(source: str, logger: LibraryLogger) -> Checkpoint:
    tree, selector = source, None
    if not os.path.isdir(source) and ":" in source:
        head, tail = source.rsplit(":", 1)
        if tail in INIT_SELECTORS or (tail.isascii() and tail.isdigit()):
            tree, selector = head, tail
    if os.path.isdir(os.path.join(tree, "ckpts")) or is_tree(tree):
        layout = locate(tree, f"ckpt_init_from {source!r}")
        selector = selector or "last"
        if selector in INIT_SELECTORS:
            epoch = layout.resolve_link(selector)
            if epoch is None:
                raise NoCheckpointError(
                    f"'{layout.link(selector)}' is absent or dangling; "
                    f"expected a link to a saved epoch"
                )
        else:
            epoch = int(selector)
            if not os.path.isdir(layout.epoch_dir(epoch)):
                # named by the user, not seen in a listing: absent, not pruned meanwhile
                raise NoCheckpointError(
                    f"'{layout.epoch_dir(epoch)}' does not exist, so it has no {INFO_FILE}; "
                    f"expected a saved epoch ('candle-ckpt list {tree}' shows them)"
                )
        return load_verified(layout, epoch, True, logger)
    if selector is None and os.path.isfile(os.path.join(tree, INFO_FILE)):
        directory = os.path.realpath(tree)
        return verified_checkpoint(directory, read_info(directory), True, logger)
    if selector is not None:
        raise NoCheckpointError(f"'{tree}' is not a checkpoint tree (no '{tree}/ckpts' directory)")
    raise NoCheckpointError(
        f"'{tree}' is neither a checkpoint tree (no 'ckpts' directory "
        f"in it) nor an epoch directory (no {INFO_FILE} in it)"
    )
