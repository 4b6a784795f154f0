"""The crash-consistent save protocol of one epoch (docs/FORMAT.md, "The save protocol").

`save_epoch` runs steps 2-6 (the list index line between 4 and 5) with a
caller-supplied function that writes the model's files into a directory; the caller
(`Checkpointer`) then repoints the links with `point_link`, `best` before `last`;
`discard_epochs` is step 8's deletion. Whatever is deleted is only renamed into
`ckpts/trash/` here; a `background.TrashCollector` removes it off the training thread.
A process killed at any instant leaves `last` pointing at a complete, verifiable epoch
(or absent if none was ever completed): the files are fsynced and checksummed in
`work/` before `work/` is renamed to `epochs/NNN`, and links are repointed only after
that rename is durable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import durable
from .background import SharedThread
from .checksum import crc32_file
from .errors import LinkError
from .faults import fault_point
from .index import append_index, directory_inode
from .info import write_info
from .layout import CheckpointLayout
from .logs import LibraryLogger

# Where a saved file is fsynced while its CRC32 is computed on the saving thread.
_fsync_thread = SharedThread("candle_ckpt-fsync")


@dataclass(frozen=True)
class ModelFile:
    """What a model writer (`write_files`) may return instead of the model file's name
    alone: the name and the file's CRC32 as the writer computed it while writing (from
    memory: `direct_io.Written`). Other files of the epoch, and a model file without a
    CRC32, are read back for theirs."""

    name: str
    crc32: int | None = None


@dataclass(frozen=True)
class WrittenFiles:
    """What step 3-4 produced: {name: {"size", "crc32"}}, the model file, timings."""

    files: dict[str, dict[str, Any]]
    model_file: str
    nbytes: int
    write_seconds: float


def prepare_tree(layout: CheckpointLayout, logger: LibraryLogger) -> None:
    """Create the tree's directories; drop a save and temporary links a crash interrupted.

    Deletions a crash interrupted are left in `trash/` for the trash collector.
    """
    os.makedirs(layout.epochs, exist_ok=True)
    _drop_leftover_work(layout, logger)
    for name in os.listdir(layout.ckpts):  # a link update killed before its os.replace
        if durable.is_temporary_name(name):
            os.unlink(os.path.join(layout.ckpts, name))
            logger.warning("removed leftover temporary link '%s'", name)


def _drop_leftover_work(layout: CheckpointLayout, logger: LibraryLogger) -> None:
    if os.path.lexists(layout.work):
        durable.move_to_trash(layout.work, layout.trash)
        logger.warning("removed leftover '%s' of an interrupted save", layout.work)


def _flush_and_checksum(path: str, compute_checksum: bool, known: int | None) -> str | None:
    """fsync `path` and return its CRC32: `known` (the writer's) if given, else read back
    from the file while the fsync runs (both release the GIL, so they overlap)."""
    if known is not None or not compute_checksum:
        durable.fsync_file(path)
        return str(known) if compute_checksum else None
    flushed = _fsync_thread.submit(durable.fsync_file, path)
    try:
        crc = str(crc32_file(path))
    finally:
        flushed.result()  # never return (or fail) before the file is durable or failed
    return crc


def _write_into_work(
    layout: CheckpointLayout,
    write_files: Callable[[str], str | ModelFile],
    compute_checksums: bool,
) -> WrittenFiles:
    started = time.perf_counter()
    os.mkdir(layout.work)
    model = write_files(layout.work)
    if not isinstance(model, ModelFile):
        model = ModelFile(model)
    model_file = model.name
    fault_point("after_write")
    files, nbytes = {}, 0
    for name in sorted(os.listdir(layout.work)):
        path = os.path.join(layout.work, name)
        if not os.path.isfile(path) or os.path.islink(path):
            raise ValueError(
                f"the model writer left '{path}', which is not a regular file; "
                f"expected only files in the epoch directory"
            )
        size = os.path.getsize(path)
        nbytes += size
        known = model.crc32 if name == model_file else None
        files[name] = {
            "size": size,
            "crc32": _flush_and_checksum(path, compute_checksums, known),
        }
    if model_file not in files:
        raise ValueError(
            f"the model writer reported model file {model_file!r} but wrote "
            f"{sorted(files)} into '{layout.work}'"
        )
    fault_point("after_fsync")
    return WrittenFiles(files, model_file, nbytes, time.perf_counter() - started)


def save_epoch(
    layout: CheckpointLayout,
    epoch: int,
    write_files: Callable[[str], str | ModelFile],
    build_info: Callable[[WrittenFiles], dict[str, Any]],
    *,
    compute_checksums: bool,
    logger: LibraryLogger,
) -> tuple[dict[str, Any], WrittenFiles]:
    """Write one epoch into `epochs/NNN` (steps 2-6); the caller then repoints the links.

    Args:
        layout: the tree's `CheckpointLayout` (`prepare_tree` must have run).
        epoch: the 1-based epoch.
        write_files: callable(directory) that writes the model's files into `directory`
            and returns the model file's name, or a `ModelFile` with its CRC32 too. It
            need not fsync.
        build_info: callable(WrittenFiles) returning the ckpt-info dict to record.
        compute_checksums: whether to compute the CRC32 of every file.
        logger: where to log.

    Returns:
        (info dict, WrittenFiles).

    On an error up to and including the rename, `work/` is removed and the error
    re-raised: `last` and the epochs on disk are as they were (but for an epoch this
    one was replacing).
    """
    _drop_leftover_work(layout, logger)
    try:
        written = _write_into_work(layout, write_files, compute_checksums)
        info = build_info(written)
        write_info(layout.work, info)
        fault_point("after_info")
        # Before the rename, which keeps the inode: see core/index.py for why.
        append_index(layout.ckpts, info, directory_inode(layout.ckpts, "work"))
        fault_point("after_index")
        destination = layout.epoch_dir(epoch)
        if os.path.lexists(destination):
            durable.move_to_trash(destination, layout.trash)
            logger.info(
                "replaced existing epoch %d (a timeline abandoned by a rollback or "
                "a restart from an earlier epoch)",
                epoch,
            )
        durable.rename_durable(layout.work, destination)
    except BaseException:
        if os.path.lexists(layout.work):
            durable.move_to_trash(layout.work, layout.trash)
        raise
    fault_point("after_rename")
    return info, written


def point_link(layout: CheckpointLayout, name: str, epoch: int | None) -> None:
    """Atomically point `last`/`best` at `epoch` (relative link), or remove it if None."""
    if epoch is None:
        durable.remove_link(layout.link(name))
    else:
        durable.replace_symlink(layout.relative_epoch_target(epoch), layout.link(name))


def repoint_links(
    layout: CheckpointLayout,
    last: int,
    best: int | None,
    logger: LibraryLogger,
    *,
    update_best: bool = True,
) -> None:
    """Point `last` at epoch `last` and `best` at epoch `best` (None: no best link).

    The one owner of the links' order, for a save and for an operator's rollback: each
    link is replaced atomically, and the two are moved in the order that keeps `best`
    at or before `last` at every instant, so no reader, and no kill or error between
    the two, sees `best` naming an epoch newer than `last`. `best` moves first when it
    goes back (a rollback) or stays at or before the current `last`; otherwise `last`
    goes forward first (a save that improved). A `best` already right is not rewritten;
    an invalid one is replaced with a warning.

    Args:
        update_best: False leaves `best` as it is (a run that tracks no metric).

    Raises:
        ValueError: `best` is newer than `last`.
    """
    if best is not None and best > last:
        raise ValueError(
            f"best epoch {best} is newer than last epoch {last}; expected best <= last"
        )
    if not update_best:
        point_link(layout, "last", last)
        return
    try:
        current_last = layout.resolve_link("last")
    except LinkError:
        current_last = None
    if best is None or (current_last is not None and best <= current_last):
        _point_best(layout, best, logger)
        fault_point("between_links")
        point_link(layout, "last", last)
    else:
        point_link(layout, "last", last)
        fault_point("between_links")
        _point_best(layout, best, logger)


def _point_best(layout: CheckpointLayout, best: int | None, logger: LibraryLogger) -> None:
    """Point `best` at `best` unless it already does (None: remove the link)."""
    try:
        current = layout.resolve_link("best")
    except LinkError as error:
        logger.warning("replacing an invalid best link: %s", error)
        point_link(layout, "best", best)
        return
    if current != best or (best is None and os.path.lexists(layout.link("best"))):
        point_link(layout, "best", best)


def discard_epochs(layout: CheckpointLayout, epochs: list[int], logger: LibraryLogger) -> None:
    """Move whole epoch directories out of `epochs/` into `trash/` (crash-safe deletion)."""
    for epoch in epochs:
        if durable.move_to_trash(layout.epoch_dir(epoch), layout.trash) is None:
            logger.warning("epoch %d was to be deleted but is already gone", epoch)
        else:
            logger.debug("deleted epoch %d (keep policy)", epoch)
