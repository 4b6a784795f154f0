"""Check the files of an epoch directory against what its ckpt-info.json records.

The one owner of "read an epoch's ckpt-info.json, check its files, say what is wrong":
a restart (`resume.load_verified`), `candle-ckpt verify`, `list --verify` and
`rollback` all go through `check_epoch`.

A tree is read while its job writes it: the keep policy moves an epoch into `trash/`
at every save, and a rollback re-run replaces `epochs/NNN`. An epoch that goes away
while it is read looks, file by file, like damage (a file "missing", a ckpt-info.json
not found, or one directory's ckpt-info.json beside another's model file). So when a
read fails or finds a bad file, `read_epoch_info` and `check_epoch` look again: if
`epochs/NNN` is gone, or is no longer the directory (inode) the read began with, they
raise `EpochVanishedError` (what was read is gone, not wrong); if it is the same
directory, the damage is real and is reported as such. A writer never changes a
directory once it is `epochs/NNN` (docs/FORMAT.md), so the same inode means the same
files.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from ..errors import (
    CheckpointError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    EpochVanishedError,
    LinkError,
    NoCheckpointError,
    add_remedy,
)
from ..format.info import read_info, recorded_files
from ..format.layout import CheckpointLayout
from ..storage.checksum import RegionPlanner, Regions, crc32_file, read_file

OVERWRITTEN = (
    "The model file's large arrays were read straight into the model's own memory (to "
    "spare a copy), so the model's values are now partly unverified bytes: load them "
    "again from a checkpoint that verifies (ckpt_restart_fallback), or rebuild the model"
)
"""What a bad model file whose arrays went into the caller's memory has done to it."""

_Read = TypeVar("_Read")

FileProgress = Callable[[str, int, int], None]
"""progress(path, bytes_done, bytes_total) while a long file is checksummed."""


@dataclass(frozen=True)
class FileCheck:
    """The outcome of checking one file.

    `problem` is None when the file is intact, else "missing", "type" (not a regular
    file), "size" or "crc32".
    `expected_size` is None for a legacy file (upstream CANDLE records no size),
    `actual_size` None when the file could not be looked at.
    `actual_crc32` is None when the CRC was not computed (none recorded, or not asked).
    `contents` holds the file's bytes (a read-only memoryview) when the check was asked
    to hold them, else None: the bytes that were checked, so a caller that uses them
    uses exactly what was verified.
    `read_into_caller` is true when some of those bytes were read into the caller's own
    memory instead (`checksum.read_file`'s `read_into`): a bad file has then already
    overwritten it.
    """

    path: str
    expected_size: int | None
    actual_size: int | None
    expected_crc32: str | None
    actual_crc32: str | None
    problem: str | None
    contents: memoryview | None = field(default=None, repr=False, compare=False)
    read_into_caller: bool = False

    def describe(self) -> str:
        """One line for a person: what is wrong with the file, or that it is fine."""
        if self.read_into_caller and self.problem in ("size", "crc32"):
            return f"{self._problem()}. {OVERWRITTEN}"
        return self._problem()

    def _problem(self) -> str:
        if self.problem == "missing":
            return f"{self.path}: listed in ckpt-info.json but missing"
        if self.problem == "type":
            return (
                f"{self.path}: not a regular file (a link, directory or device); "
                f"ckpt-info.json lists a file of the epoch directory"
            )
        if self.problem == "size":
            return (
                f"{self.path}: size {self.actual_size} bytes, "
                f"ckpt-info.json records {self.expected_size}"
            )
        if self.problem == "crc32":
            return (
                f"{self.path}: CRC32 {self.actual_crc32}, "
                f"ckpt-info.json records {self.expected_crc32}"
            )
        state = "ok" if self.actual_crc32 is not None else "not verified (no CRC32 recorded)"
        return f"{self.path}: {state}"


@dataclass(frozen=True)
class EpochCheck:
    """An epoch's validated ckpt-info dict and the check of every file it lists."""

    epoch: int
    info: dict[str, Any]
    files: list[FileCheck]

    @property
    def bad(self) -> list[FileCheck]:
        """The files that are missing, not regular, of the wrong size or CRC32."""
        return [check for check in self.files if check.problem is not None]

    @property
    def all_checksummed(self) -> bool:
        """Whether every file's CRC32 was computed (and so compared)."""
        return all(check.actual_crc32 is not None for check in self.files)

    def problems(self) -> str:
        """The bad files, described on one line ("" when all are intact)."""
        return "; ".join(check.describe() for check in self.bad)

    def raise_if_bad(self) -> None:
        """Raise on the first bad file, in name order.

        Raises:
            ChecksumMismatchError: its CRC32 differs (names file, expected, actual).
            CorruptCheckpointError: it is missing, not a regular file or of the wrong size.
        """
        for check in self.bad:
            if check.problem == "crc32":
                error = ChecksumMismatchError(
                    check.path, str(check.expected_crc32), str(check.actual_crc32)
                )
                raise add_remedy(error, OVERWRITTEN) if check.read_into_caller else error
            raise CorruptCheckpointError(check.describe() + "; refusing to load this checkpoint")


def check_files(
    epoch_dir: str,
    info: dict[str, Any],
    verify_checksums: bool = True,
    progress: FileProgress | None = None,
    hold_contents_of: str | None = None,
    read_into: RegionPlanner | None = None,
) -> list[FileCheck]:
    """Check every file recorded in `info`, in name order; returns a list of FileCheck.

    Args:
        epoch_dir: the epoch directory.
        info: its ckpt-info dict (already validated).
        verify_checksums: whether to compute and compare CRC32s (sizes and presence are
            always checked).
        progress: optional callable(path, bytes_done, bytes_total) for long files.
        hold_contents_of: the name of one file to read into memory while it is checked;
            its FileCheck's `contents` holds the bytes (no progress is reported for it).
        read_into: for that file, where its large arrays go instead of the contents,
            once the file matches its recorded CRC32 (`checksum.read_file`).
    """
    results = []
    for name, (size, crc) in sorted(recorded_files(info).items()):
        path = os.path.join(epoch_dir, name)
        try:
            status = os.lstat(path)
        except FileNotFoundError:
            results.append(FileCheck(path, size, None, crc, None, "missing"))
            continue
        if not stat.S_ISREG(status.st_mode):  # a link could lead out of the tree
            results.append(FileCheck(path, size, None, crc, None, "type"))
            continue
        actual_size = status.st_size
        if size is not None and actual_size != size:
            results.append(FileCheck(path, size, actual_size, crc, None, "size"))
            continue
        compute = verify_checksums and crc is not None
        contents = None
        computed: int | None = None
        planned: list[Regions] = []
        if name == hold_contents_of:
            contents, computed = read_file(
                path,
                compute_crc=compute,
                read_into=_noting(read_into, planned),
                expected_crc=int(crc) if crc is not None and crc.isdigit() else None,
            )
            actual_size = len(contents)
            overwritten = any(planned)
            if size is not None and actual_size != size:  # it shrank while being read
                results.append(
                    FileCheck(path, size, actual_size, crc, None, "size", None, overwritten)
                )
                continue
        elif compute:
            computed = crc32_file(path, progress=_file_progress(progress, path, actual_size))
        actual_crc = None if computed is None else str(computed)
        problem = "crc32" if actual_crc is not None and actual_crc != crc else None
        results.append(
            FileCheck(path, size, actual_size, crc, actual_crc, problem, contents, any(planned))
        )
    return results


def _noting(read_into: RegionPlanner | None, planned: list[Regions]) -> RegionPlanner | None:
    """`read_into`, appending what it returns to `planned`."""
    if read_into is None:
        return None

    def plan(path: str, stream: BinaryIO) -> Regions:
        planned.append(read_into.plan(path, stream))
        return planned[-1]

    return dataclasses.replace(read_into, plan=plan)


def _file_progress(
    progress: FileProgress | None, path: str, total: int
) -> Callable[[int], None] | None:
    """`crc32_file`'s progress(bytes_done) for one file, reported as `progress` wants."""
    if progress is None:
        return None
    return lambda done: progress(path, done, total)


def verify_files(
    epoch_dir: str,
    info: dict[str, Any],
    verify_checksums: bool = True,
    hold_contents_of: str | None = None,
) -> list[FileCheck]:
    """Raise on the first file that is missing, truncated or fails its CRC32.

    Returns the list of FileCheck (all intact) so callers can report unverified files;
    the one named `hold_contents_of`, if any, holds the file's verified bytes (see
    `check_files`).

    Raises:
        CorruptCheckpointError: a file is missing, not a regular file or has the wrong size.
        ChecksumMismatchError: a file's CRC32 differs (names file, expected, actual).
    """
    files = check_files(epoch_dir, info, verify_checksums, hold_contents_of=hold_contents_of)
    EpochCheck(info["epoch"], info, files).raise_if_bad()
    return files


EpochIdentity = tuple[int, int]
"""(st_dev, st_ino) of an epoch directory: which directory a read began with."""


def epoch_identity(layout: CheckpointLayout, epoch: int, batch: int = 0) -> EpochIdentity:
    """The identity of epoch `epoch`'s directory (with `batch` > 0: of the step
    checkpoint's), to tell later whether it went away.

    Raises:
        EpochVanishedError: there is no `epochs/NNN` (any more): every caller has just
            seen the epoch, in a listing or through a link.
    """
    directory = layout.checkpoint_dir(epoch, batch)
    try:
        status = os.lstat(directory)
    except FileNotFoundError:
        raise _vanished(epoch, directory, "is gone") from None
    return status.st_dev, status.st_ino


def raise_if_moved(
    layout: CheckpointLayout, epoch: int, identity: EpochIdentity, batch: int = 0
) -> None:
    """Raise EpochVanishedError if epoch `epoch`'s directory (`batch`: see
    `epoch_identity`) is no longer the one `identity` names (gone, or replaced);
    return if it is the same directory."""
    directory = layout.checkpoint_dir(epoch, batch)
    try:
        status = os.lstat(directory)
    except FileNotFoundError:
        raise _vanished(epoch, directory, "is gone") from None
    if (status.st_dev, status.st_ino) != identity:
        raise _vanished(epoch, directory, "was replaced by another directory")


def _vanished(epoch: int, directory: str, what: str) -> EpochVanishedError:
    return EpochVanishedError(
        f"epoch {epoch}: '{directory}' {what}: pruned or moved away (into trash/) by "
        f"the job writing the tree while it was read; not damage. Run the command again, "
        f"or name an epoch the job keeps"
    )


def read_epoch_info(layout: CheckpointLayout, epoch: int, batch: int = 0) -> dict[str, Any]:
    """The validated ckpt-info dict of epoch `epoch`, which must record that epoch
    (with `batch` > 0: of that step checkpoint, which must record both).

    Raises:
        EpochVanishedError: the directory was pruned or replaced before or while the
            file was read (see the module docstring).
        LinkError: the epoch directory is a symbolic link.
        NoCheckpointError: the epoch directory has no ckpt-info.json.
        CheckpointFormatError: the file is unreadable or invalid (see `read_info`).
        CheckpointError: the file records another epoch than its directory's.
    """
    return _unless_moved(layout, epoch, lambda: _read_epoch_info(layout, epoch, batch), batch)


def _unless_moved(
    layout: CheckpointLayout,
    epoch: int,
    read: Callable[[], _Read],
    batch: int = 0,
    damaged: Callable[[_Read], bool] = lambda _: False,
) -> _Read:
    """read() of epoch `epoch` (`batch`: see `epoch_identity`); when it fails, or finds
    its result `damaged`, first EpochVanishedError if the directory is no longer the
    one the read began with."""
    identity = epoch_identity(layout, epoch, batch)
    try:
        result = read()
    except (CheckpointError, OSError):
        raise_if_moved(layout, epoch, identity, batch)
        raise
    if damaged(result):
        raise_if_moved(layout, epoch, identity, batch)
    return result


def _read_epoch_info(layout: CheckpointLayout, epoch: int, batch: int = 0) -> dict[str, Any]:
    directory = layout.checkpoint_dir(epoch, batch)
    if os.path.islink(directory):
        raise LinkError(
            f"'{directory}' is a symbolic link (-> '{os.readlink(directory)}'); "
            f"expected a checkpoint directory inside '{os.path.dirname(directory)}'"
        )
    try:
        info = read_info(directory)
    except FileNotFoundError:
        raise NoCheckpointError(
            f"'{directory}' has no ckpt-info.json; expected a complete epoch directory"
        ) from None
    if info["epoch"] != epoch:
        raise CheckpointError(
            f"'{directory}/ckpt-info.json': key 'epoch' is {info['epoch']}; "
            f"expected {epoch}, the epoch of its directory"
        )
    if info.get("batch", 0) != batch:
        raise CheckpointError(
            f"'{directory}/ckpt-info.json': key 'batch' is {info.get('batch', 0)}; "
            f"expected {batch}, the batch of its directory"
        )
    return info


def check_epoch(
    layout: CheckpointLayout,
    epoch: int,
    *,
    verify_checksums: bool = True,
    progress: FileProgress | None = None,
    hold_model_contents: bool = False,
    read_into: RegionPlanner | None = None,
    batch: int = 0,
) -> EpochCheck:
    """Read and validate epoch `epoch`'s ckpt-info.json, then check every file it lists
    (with `batch` > 0: those of the step checkpoint after `epoch` epochs and `batch`
    batches).

    The ckpt-info.json is validated before any file it names is opened. Bad files are
    reported in the result (`EpochCheck.bad`), not raised; `EpochCheck.raise_if_bad`
    turns them into the error a restart raises. With `hold_model_contents`, the model
    file's FileCheck holds its verified bytes (see `check_files`), its large arrays read
    into `read_into`'s buffers if given.

    A file found bad, or a read that fails, is damage only if `epochs/NNN` is still
    the directory the check began with (see the module docstring).

    Raises:
        EpochVanishedError: the directory was pruned or replaced during the check.
        the errors of `read_epoch_info` (no, invalid or mismatched ckpt-info.json).
    """

    def read() -> EpochCheck:
        info = _read_epoch_info(layout, epoch, batch)
        files = check_files(
            layout.checkpoint_dir(epoch, batch),
            info,
            verify_checksums,
            progress,
            info["model_file"] if hold_model_contents else None,
            read_into,
        )
        return EpochCheck(epoch, info, files)

    return _unless_moved(layout, epoch, read, batch, lambda check: bool(check.bad))
