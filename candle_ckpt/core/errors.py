"""The exceptions candle_ckpt raises, so that callers can catch what they mean.

Every message names the key or path involved, what was found and what was expected.
Parameter errors are also `TypeError`/`ValueError`, as CANDLE's were.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by candle_ckpt."""


def add_remedy(error: CheckpointError, remedy: str) -> CheckpointError:
    """Append what the user can do about `error` to its message; return `error`.

    The error keeps its type (callers catch what they mean) and its traceback; only a
    message-only error (one string argument, as every restart error is) is extended.
    """
    if len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}. {remedy}",)
    return error


def failed_after_checks(
    path: str, what: str, error: BaseException, loaded: str
) -> CheckpointFormatError:
    """The error for `what` ("entry 'optimizer'", "variable 'dense/kernel'") of the
    model file `path`, which passed every check of a restart and then failed to load
    with `error`: a check candle_ckpt lacks, so the message says what is loaded
    already (`loaded`)."""
    first_line = str(error).partition("\n")[0][:200]
    return CheckpointFormatError(
        f"'{path}': {what} passed every check, then failed to load "
        f"({type(error).__name__}: {first_line}); loaded before it: {loaded}. Rebuild "
        f"the model and its optimizer, or restart from another checkpoint"
    )


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
            f"the file has {actual}; the checkpoint is corrupt, refusing to load it"
        )
        self.path, self.expected, self.actual = path, expected, actual


class CheckpointWriteError(CheckpointError, OSError):
    """A save failed on an I/O error (disk full, EIO); `last` still names a complete epoch."""


class LinkError(CheckpointError):
    """A `last`/`best` link resolves outside `ckpts/epochs/`, to a file, or in a loop."""


class UnsafePathError(CheckpointError):
    """A path the library writes in a checkpoint tree is not what it writes there: a
    link (planted, or a typo in an `ln -s`), a file where a directory belongs, or the
    reverse. Refused rather than followed or repaired (core/storage/tree_fs.py)."""


class EpochVanishedError(NoCheckpointError):
    """An epoch directory went away while it was read: pruned (moved into `trash/`) or
    replaced by a writer. Not damage: what was read is gone, not wrong (core/restore/verify.py)."""


class WriterLockedError(CheckpointError):
    """Another process holds the writer lock (`ckpts/.lock`) of the checkpoint tree."""


# The exit statuses of a job that stops on one of these errors (the example benchmarks
# exit with them; `examples/slurm_job.sh` requeues only PREEMPTED_EXIT_STATUS, 75).
BAD_PARAMETER_EXIT_STATUS = 2
"""A `ckpt_*` parameter is wrong (argparse's status for a bad command line)."""
RESTART_REFUSED_EXIT_STATUS = 3
"""The checkpoint to restart from is unusable: corrupt, invalid, a bad `last` link,
none in `required` mode, or the processes disagree on it; or a path the job writes in
the tree is a link or of the wrong kind (`UnsafePathError`)."""
TREE_LOCKED_EXIT_STATUS = 4
"""Another job writes the checkpoint tree (`ckpts/.lock`)."""
SAVE_FAILED_EXIT_STATUS = 5
"""A save failed on an I/O error; `last` still names a complete epoch."""


def exit_status(error: CheckpointError) -> int:
    """The exit status a job stopped by `error` should end with (see above)."""
    if isinstance(error, (ParameterTypeError, ParameterValueError)):
        return BAD_PARAMETER_EXIT_STATUS
    if isinstance(error, WriterLockedError):
        return TREE_LOCKED_EXIT_STATUS
    if isinstance(error, CheckpointWriteError):
        return SAVE_FAILED_EXIT_STATUS
    return RESTART_REFUSED_EXIT_STATUS
