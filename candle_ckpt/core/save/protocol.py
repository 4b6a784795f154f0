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

import contextlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..storage import durable, trash, tree_fs
from ..storage.background import SharedThread
from ..storage.checksum import crc32_file
from ..errors import LinkError, UnsafePathError
from ..storage.faults import fault_point
from ..format.index import append_index, directory_inode
from ..format.info import write_info
from ..format.layout import STEP_LINK, CheckpointLayout
from ..logs import LibraryLogger

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

    Raises:
        UnsafePathError: a path the writer writes is a link or of the wrong kind
            (`tree_fs.check_tree`); nothing was changed.
    """
    tree_fs.refuse_unsafe_tree(layout)
    with tree_fs.directory(layout.root, layout.epochs, create=True):
        pass
    _drop_leftover_work(layout, logger)
    with tree_fs.directory(layout.root, layout.ckpts) as ckpts:
        for name in os.listdir(ckpts):  # a link update killed before its rename
            if durable.is_temporary_name(name):
                durable.remove_entry(ckpts, name)
                logger.warning("removed leftover temporary link '%s'", name)


def _drop_leftover_work(layout: CheckpointLayout, logger: LibraryLogger) -> None:
    if trash.move_to_trash(layout, layout.work) is not None:
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


def _make_work(layout: CheckpointLayout, ckpts: int) -> tuple[int, int]:
    """Make `work/` in the directory open as `ckpts`, private to this user while the
    model writer fills it; return (its descriptor, the mode to give it back).

    The model writers open their files by path (through this descriptor where /proc
    allows: `tree_fs.through_descriptor`), so nobody else may put a link where they
    will write: the directory has mode 0700 until `save_epoch` has written its
    ckpt-info.json, and is checked empty once it has it (whatever another user put in
    before is refused).
    """
    os.mkdir("work", dir_fd=ckpts)
    work = tree_fs.open_subdirectory(ckpts, "work", layout.work)
    try:
        mode = stat.S_IMODE(os.fstat(work).st_mode)
        os.fchmod(work, 0o700)
        planted = os.listdir(work)
        if planted:
            raise tree_fs.unsafe(
                layout.work,
                f"holding {planted} just after this save made it",
                "an empty directory",
            )
    except BaseException:
        os.close(work)
        raise
    return work, mode


def _write_into_work(
    layout: CheckpointLayout,
    work: int,
    write_files: Callable[[str], str | ModelFile],
    compute_checksums: bool,
) -> WrittenFiles:
    started = time.perf_counter()
    # The writers open their files by path; through `work`'s descriptor, a link swapped
    # in for `ckpts/` or `work/` meanwhile is not followed (the kernel resolves
    # /proc/self/fd/N to the open directory itself, not to a path looked up again).
    reached = tree_fs.through_descriptor(work, layout.work)
    try:
        model = write_files(reached)
    except OSError as error:
        raise tree_fs.named_by_path(error, reached, layout.work) from None
    if not isinstance(model, ModelFile):
        model = ModelFile(model)
    model_file = model.name
    fault_point("after_write")
    # It wrote by path: into this directory? (Everything after goes through `work`.)
    tree_fs.require_same(layout.root, layout.work, work)
    files, nbytes = {}, 0
    for name in sorted(os.listdir(work)):
        path = os.path.join(layout.work, name)
        status = os.stat(name, dir_fd=work, follow_symlinks=False)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError(
                f"the model writer left '{path}', which is not a regular file; "
                f"expected only files in the epoch directory"
            )
        nbytes += status.st_size
        known = model.crc32 if name == model_file else None
        try:
            crc32 = _flush_and_checksum(os.path.join(reached, name), compute_checksums, known)
        except OSError as error:
            raise tree_fs.named_by_path(error, reached, layout.work) from None
        files[name] = {"size": status.st_size, "crc32": crc32}
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
    batch: int = 0,
) -> tuple[dict[str, Any], WrittenFiles]:
    """Write one epoch into `epochs/NNN` (steps 2-6); the caller then repoints the links.

    With `batch` > 0, a step checkpoint instead: `steps/NNN.BBBBBB`, after `epoch`
    completed epochs and `batch` batches of the next, with no line in the list index
    (which describes `epochs/` only).

    Args:
        layout: the tree's `CheckpointLayout` (`prepare_tree` must have run).
        epoch: the 1-based epoch (of a step checkpoint: the epochs completed).
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

    Raises:
        UnsafePathError: a directory of the tree, or `work/` while it was written, was
            replaced by a link or something else (core/storage/tree_fs.py); nothing outside the
            tree was followed.
    """
    _drop_leftover_work(layout, logger)
    with tree_fs.directory(layout.root, layout.ckpts) as ckpts:
        try:
            work, mode = _make_work(layout, ckpts)
            try:
                made = os.fstat(work)
                written = _write_into_work(layout, work, write_files, compute_checksums)
                info = build_info(written)
                write_info(layout.work, info, dir_fd=work)
                fault_point("after_info")
                os.fchmod(work, mode)
            finally:
                os.close(work)
            if not batch:
                # Before the rename, which keeps the inode: see core/format/index.py.
                append_index(layout.root, layout.ckpts, info, directory_inode(ckpts, "work"))
                fault_point("after_index")
            what = f"step checkpoint {epoch}.{batch}" if batch else f"epoch {epoch}"
            _rename_work(layout, ckpts, layout.checkpoint_dir(epoch, batch), made, logger, what)
        except BaseException:
            with contextlib.suppress(UnsafePathError):  # a link there is left, not followed
                trash.move_to_trash(layout, layout.work)
            raise
    fault_point("after_rename")
    return info, written


def _rename_work(
    layout: CheckpointLayout,
    ckpts: int,
    destination: str,
    made: os.stat_result,
    logger: LibraryLogger,
    what: str,
) -> None:
    """Rename `work/` (the directory whose status is `made`) to `destination`,
    `epochs/NNN` or `steps/NNN.BBBBBB` (step 5-6); `what` names it in the log."""
    name = os.path.basename(destination)
    with tree_fs.directory(layout.root, os.path.dirname(destination), create=True) as epochs:
        if tree_fs.require_directory(epochs, name, destination) is not None:
            trash.move_to_trash(layout, destination)
            logger.info(
                "replaced existing %s (a timeline abandoned by a rollback or a restart "
                "from an earlier checkpoint)",
                what,
            )
        tree_fs.require_entry_is(ckpts, "work", layout.work, made)
        durable.rename_at(ckpts, "work", epochs, name)
        # A swap between the check and the rename moved another entry there: refused
        # before a link names it (a link there is never followed: see resolve_link).
        tree_fs.require_entry_is(epochs, name, destination, made)


def point_link(layout: CheckpointLayout, name: str, epoch: int | None) -> None:
    """Atomically point `last`/`best` at `epoch` (relative link), or remove it if None."""
    with tree_fs.directory(layout.root, layout.ckpts) as ckpts:
        if epoch is None:
            durable.remove_entry(ckpts, name)
        else:
            durable.replace_symlink(layout.relative_epoch_target(epoch), ckpts, name)


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


def point_step_link(layout: CheckpointLayout, step: tuple[int, int] | None) -> None:
    """Atomically point `last_step` at the step checkpoint `step` (epochs, batches), or
    remove it if None."""
    with tree_fs.directory(layout.root, layout.ckpts) as ckpts:
        if step is None:
            durable.remove_entry(ckpts, STEP_LINK)
        else:
            target = os.path.relpath(layout.step_dir(*step), layout.ckpts)
            durable.replace_symlink(target, ckpts, STEP_LINK)


def discard_steps(
    layout: CheckpointLayout, keep: tuple[int, int] | None, logger: LibraryLogger
) -> None:
    """Move every step checkpoint but `keep` out of `steps/` into `trash/`: a later
    save supersedes them (docs/FORMAT.md, "Step checkpoints")."""
    for step in layout.list_steps():
        if step != keep and trash.move_to_trash(layout, layout.step_dir(*step)) is not None:
            logger.debug("deleted step checkpoint %s (superseded)", layout.step_dir(*step))


def discard_epochs(layout: CheckpointLayout, epochs: list[int], logger: LibraryLogger) -> None:
    """Move whole epoch directories out of `epochs/` into `trash/` (crash-safe deletion)."""
    for epoch in epochs:
        if trash.move_to_trash(layout, layout.epoch_dir(epoch)) is None:
            logger.warning("epoch %d was to be deleted but is already gone", epoch)
        else:
            logger.debug("deleted epoch %d (keep policy)", epoch)
