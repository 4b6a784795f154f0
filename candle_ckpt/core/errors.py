"""The exceptions candle_ckpt raises, so that callers can catch what they mean.

Every message names the key or path involved, what was found and what was expected.
Parameter errors are also `TypeError`/`ValueError`, as CANDLE's were.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by candle_ckpt."""


class ParameterTypeError(CheckpointError, TypeError):
    """A `--ckpt_*` parameter has a value of the wrong type."""


class ParameterValueError(CheckpointError, ValueError):
    """A `--ckpt_*` parameter has a value outside its allowed range or set."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """`ckpt_restart_mode=required` but there is no usable checkpoint."""


class CheckpointFormatError(CheckpointError, ValueError):
    """A checkpoint file is unreadable, malformed or violates the schema."""


class CorruptCheckpointError(CheckpointError):
    """A file listed in ckpt-info.json is missing, has the wrong size or wrong CRC32."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A file's CRC32 differs from the one recorded in ckpt-info.json."""

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch in '{path}': ckpt-info.json records CRC32 {expected}, "
            f"the file has {actual}; the checkpoint is corrupt, refusing to load it")
        self.path, self.expected, self.actual = path, expected, actual


class CheckpointWriteError(CheckpointError, OSError):
    """A save failed on an I/O error (disk full, EIO); `last` still names a complete epoch."""


class LinkError(CheckpointError):
    """A `last`/`best` link resolves outside `ckpts/epochs/`, to a file, or in a loop."""


class WriterLockedError(CheckpointError):
    """Another process holds the writer lock (`ckpts/.lock`) of the checkpoint tree."""
