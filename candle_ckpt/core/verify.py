"""Check the files of an epoch directory against what its ckpt-info.json records."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from .checksum import crc32_file, read_file
from .errors import ChecksumMismatchError, CorruptCheckpointError
from .info import recorded_files


@dataclass(frozen=True)
class FileCheck:
    """The outcome of checking one file.

    `problem` is None when the file is intact, else "missing", "type" (not a regular
    file), "size" or "crc32".
    `actual_crc32` is None when the CRC was not computed (none recorded, or not asked).
    `contents` holds the file's bytes (a read-only memoryview) when the check was asked
    to keep them, else None: the bytes that were checked, so a caller that uses them
    uses exactly what was verified.
    """
    path: str
    expected_size: int
    actual_size: int
    expected_crc32: str
    actual_crc32: str
    problem: str
    contents: memoryview | None = field(default=None, repr=False, compare=False)

    def describe(self):
        """One line for a person: what is wrong with the file, or that it is fine."""
        if self.problem == "missing":
            return f"{self.path}: listed in ckpt-info.json but missing"
        if self.problem == "type":
            return (f"{self.path}: not a regular file (a link, directory or device); "
                    f"ckpt-info.json lists a file of the epoch directory")
        if self.problem == "size":
            return (f"{self.path}: size {self.actual_size} bytes, "
                    f"ckpt-info.json records {self.expected_size}")
        if self.problem == "crc32":
            return (f"{self.path}: CRC32 {self.actual_crc32}, "
                    f"ckpt-info.json records {self.expected_crc32}")
        state = "ok" if self.actual_crc32 is not None else "not verified (no CRC32 recorded)"
        return f"{self.path}: {state}"


def check_files(epoch_dir, info, checksums=True, progress=None, keep=None):
    """Check every file recorded in `info`, in name order; returns a list of FileCheck.

    Args:
        epoch_dir: the epoch directory.
        info: its ckpt-info dict (already validated).
        checksums: whether to compute CRC32s (sizes and presence are always checked).
        progress: optional callable(path, bytes_done, bytes_total) for long files.
        keep: the name of one file to read into memory while it is checked; its
            FileCheck's `contents` holds the bytes (no progress is reported for it).
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
        compute = checksums and crc is not None
        contents = actual_crc = None
        if name == keep:
            contents, actual_crc = read_file(path, checksum=compute)
            actual_size = len(contents)
            if size is not None and actual_size != size:  # it shrank while being read
                results.append(FileCheck(path, size, actual_size, crc, None, "size"))
                continue
        elif compute:
            report = None if progress is None else (
                lambda done, path=path, total=actual_size: progress(path, done, total))
            actual_crc = crc32_file(path, progress=report)
        actual_crc = None if actual_crc is None else str(actual_crc)
        problem = "crc32" if actual_crc is not None and actual_crc != crc else None
        results.append(FileCheck(path, size, actual_size, crc, actual_crc, problem, contents))
    return results


def verify_files(epoch_dir, info, checksums=True, keep=None):
    """Raise on the first file that is missing, truncated or fails its CRC32.

    Returns the list of FileCheck (all intact) so callers can report unverified files;
    the one named `keep`, if any, holds the file's verified bytes (see `check_files`).

    Raises:
        CorruptCheckpointError: a file is missing, not a regular file or has the wrong size.
        ChecksumMismatchError: a file's CRC32 differs (names file, expected, actual).
    """
    results = check_files(epoch_dir, info, checksums, keep=keep)
    for result in results:
        if result.problem == "crc32":
            raise ChecksumMismatchError(result.path, result.expected_crc32, result.actual_crc32)
        if result.problem is not None:
            raise CorruptCheckpointError(result.describe() + "; refusing to load this checkpoint")
    return results
