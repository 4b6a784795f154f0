"""What an operator does to a checkpoint tree between jobs: roll back and prune.

Each operation is planned first, reading only (that plan is what `--dry-run` prints),
then applied with the save protocol's own crash-safe steps: links are repointed
atomically and stored relative (`protocol.point_link`), epochs are deleted by renaming
them out of `epochs/` before removing them (`trash.discard_tree`). Neither touches
`work/` or the leftovers in `trash/`, which the next run cleans. Each takes the writer
lock on `ckpts/.lock` while it applies (`as_the_writer`), so it refuses while a training
job writes the tree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..core.errors import CheckpointError, CorruptCheckpointError
from ..core.format.info import checkpoint_info
from ..core.format.layout import LINK_NAMES, CheckpointLayout
from ..core.format.steps import StepState, survey_steps
from ..core.logs import LibraryLogger
from ..core.restore.resume import legacy_best_epoch
from ..core.restore.verify import FileCheck, FileProgress, check_epoch
from ..core.run.lock import OPERATOR_REMEDY, WriterLock
from ..core.save.policies import epochs_to_keep
from ..core.save.protocol import point_step_link, repoint_links
from ..core.storage import trash, tree_fs
from .inventory import describe_epochs, link_state, require_epoch_dir


@dataclass(frozen=True)
class RollbackPlan:
    """Where `last` and `best` will point, and why `best` points there."""

    epoch: int
    best: int | None
    best_reason: str
    checks: list[FileCheck]


def best_epoch_at(layout: CheckpointLayout, info: dict[str, Any]) -> tuple[int | None, str]:
    """The best epoch at or before the epoch of `info`, by its recorded metric: (epoch, why).

    A candle_ckpt file records `epoch_best`, the best epoch of its run so far; an
    upstream CANDLE file only the best value, from which `resume.legacy_best_epoch`
    finds the epoch. None when no metric is tracked or that epoch is gone.
    """
    record = checkpoint_info(info)
    epoch, metric, value = record.epoch, record.save_best_metric, record.best_metric_last
    if metric is None or value is None:
        return None, f"epoch {epoch} records no best {metric or 'metric'} value"
    if not record.legacy:
        best = record.epoch_best
        if best is not None and best <= epoch and os.path.isdir(layout.epoch_dir(best)):
            return best, f"epoch_best recorded by epoch {epoch} ({metric}={value:.6g})"
        return None, f"epoch_best {best} recorded by epoch {epoch} is not on disk"
    best = legacy_best_epoch(layout, info)
    if best is None:
        return None, f"no epoch on disk at or before {epoch} records {metric}={value:.6g}"
    return best, f"first epoch recording the best {metric}={value:.6g} of epoch {epoch}"


def plan_rollback(
    layout: CheckpointLayout, epoch: int, progress: FileProgress | None = None
) -> RollbackPlan:
    """Verify epoch `epoch` and decide where `best` goes; change nothing.

    Args:
        layout: the tree.
        epoch: the epoch `last` is to point at.
        progress: optional callable(path, bytes_done, bytes_total) while checksumming.

    Raises:
        NoCheckpointError: the epoch has no directory or no ckpt-info.json.
        CheckpointFormatError: its ckpt-info.json is invalid.
        CorruptCheckpointError: a file it lists is missing, truncated or fails its CRC32.
    """
    require_epoch_dir(layout, epoch)
    check = check_epoch(layout, epoch, progress=progress)
    if check.bad:
        raise CorruptCheckpointError(
            f"refusing to roll back to epoch {epoch}, which does not verify: {check.problems()}"
        )
    best, reason = best_epoch_at(layout, check.info)
    return RollbackPlan(epoch, best, reason, check.files)


@contextlib.contextmanager
def as_the_writer(layout: CheckpointLayout, logger: LibraryLogger) -> Iterator[None]:
    """Change the tree only while no training job writes it: hold `ckpts/.lock`.

    Raises:
        UnsafePathError: a path the operation may write is a link or of the wrong kind
            (core/storage/tree_fs.py); nothing is changed.
        WriterLockedError: a running job holds the lock (names its pid, host, start).
    """
    tree_fs.refuse_unsafe_tree(layout)
    lock = WriterLock(layout.ckpts, logger, remedy=OPERATOR_REMEDY)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def apply_rollback(layout: CheckpointLayout, plan: RollbackPlan, logger: LibraryLogger) -> None:
    """Repoint `last` and `best`, each atomically and in the save protocol's order
    (`protocol.repoint_links`), as the tree's writer (`as_the_writer`); then remove
    `last_step`: the run resumes at the end of the epoch rolled back to, even when
    that is the epoch a step checkpoint continues (the step checkpoints stay, as
    abandoned epochs do, until `prune --abandoned`)."""
    with as_the_writer(layout, logger):
        repoint_links(layout, plan.epoch, plan.best, logger)
        point_step_link(layout, None)
    logger.info(
        "rollback: last -> epoch %d, best -> %s (%s)",
        plan.epoch,
        "none" if plan.best is None else f"epoch {plan.best}",
        plan.best_reason,
    )


def protected_epochs(layout: CheckpointLayout) -> tuple[int | None, int | None]:
    """The epochs `last` and `best` point at: (last, best), each possibly None.

    Raises:
        CheckpointError: a link is dangling or invalid, so what it protects is unknown.
    """
    states = [link_state(layout, name) for name in LINK_NAMES]
    for state in states:
        if state.problem is not None:
            raise CheckpointError(
                f"{state.problem}; refusing to delete anything until "
                f"it is repaired (candle-ckpt rollback EPOCH)"
            )
    last, best = (state.epoch for state in states)
    return last, best


def plan_prune(layout: CheckpointLayout, keep: int, mode: str) -> list[int]:
    """The epochs a keep policy deletes, across all runs; never `last` or `best`.

    The policy (`policies.epochs_to_keep`, "linear" or "exponential", at most `keep`)
    applies to the epochs up to `last` as if they were one run ending at `last`.
    Epochs after `last` are left to `plan_abandoned`.
    """
    last, best = protected_epochs(layout)
    epochs = [e for e in layout.list_epochs() if last is None or e <= last]
    if not epochs:
        return []
    kept = epochs_to_keep(epochs, last or epochs[-1], mode, keep) | {last, best}
    return [e for e in epochs if e not in kept]


def plan_abandoned(layout: CheckpointLayout) -> list[int]:
    """The epochs after `last` (a timeline a rollback left), except `best`.

    Raises:
        CheckpointError: there is no `last`, so no timeline to compare with.
    """
    last, best = protected_epochs(layout)
    if last is None:
        raise CheckpointError(
            f"'{layout.link('last')}' does not exist, so no epoch is "
            f"after it; expected a link to the epoch to keep"
        )
    return [e for e in layout.list_epochs() if e > last and e != best]


def plan_abandoned_steps(layout: CheckpointLayout) -> list[StepState]:
    """The step checkpoints no restart resumes from (superseded, unlinked, unreadable):
    all but the one `last_step` names while it continues `last`."""
    return [state for state in survey_steps(layout) if not state.resumed]


def apply_prune_steps(
    layout: CheckpointLayout, steps: list[StepState], logger: LibraryLogger
) -> None:
    """Delete the step checkpoints `steps` now, as `apply_prune` deletes epochs."""
    with as_the_writer(layout, logger):
        for state in steps:
            logger.info("prune (--abandoned): deleting step checkpoint %s", state.directory)
            trash.discard_tree(layout, state.directory)


def apply_prune(
    layout: CheckpointLayout, epochs: list[int], reason: str, logger: LibraryLogger
) -> None:
    """Delete `epochs` now, crash-safely: each is renamed out of `epochs/`, then removed.

    `trash.discard_tree` rather than the save path's `protocol.discard_epochs`, which
    may leave the removal to the training job's background trash collector: a prune
    frees the space before it returns. Done as the tree's writer (`as_the_writer`).
    """
    with as_the_writer(layout, logger):
        logger.info("prune (%s): deleting epochs %s", reason, describe_epochs(epochs))
        for epoch in epochs:
            if trash.discard_tree(layout, layout.epoch_dir(epoch)) is None:
                logger.warning("epoch %d was to be deleted but is already gone", epoch)
