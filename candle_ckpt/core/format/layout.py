"""Where everything lives in a checkpoint tree, and how links are resolved.

::

    <ckpt_directory>/
      ckpt.log
      ckpts/
        work/          a save in progress
        trash/         directories being deleted (renamed here first, then removed)
        epochs/001/    one directory per saved epoch, "%03d" of the 1-based epoch
        steps/002.000150/  a step checkpoint: 2 epochs and 150 batches of the third
        last -> epochs/NNN
        best -> epochs/NNN
        last_step -> steps/NNN.BBBBBB   the step checkpoint that continues `last`

Every path derives from `ckpt_directory`; nothing here touches the disk except to read.
A tree written by upstream CANDLE (candle_lib) has no `ckpts/` level: `epochs/`, `last`,
`best` and ckpt.log sit in the directory it names (`CheckpointLayout(d, tree=d)`).
Which of the two a run uses is decided by one rule, `core.format.locate`.
"""

from __future__ import annotations

import os

from ..errors import LinkError, ParameterValueError

DEFAULT_CKPT_DIRECTORY = "./save"  # the default of the ckpt_directory parameter
INFO_FILE = "ckpt-info.json"
LOG_FILE = "ckpt.log"
# The files of `ckpts/` beside the epochs (docs/FORMAT.md): named here, so that
# `tree_fs.check_tree` knows them without importing the modules that write them.
LOCK_FILE = ".lock"
HISTORY_FILE = "history.jsonl"
INDEX_FILE = "index.jsonl"
CACHE_FILE = "history.cache"
LINK_NAMES = ("last", "best")
STEP_LINK = "last_step"


def epoch_dirname(epoch: int) -> str:
    """The directory name of a 1-based epoch: "001", ..., "999", "1000"."""
    return "%03d" % epoch


def parse_epoch_dirname(name: str) -> int | None:
    """The epoch number of an epoch directory name, or None if it is not one.

    Only canonical names count ("007", not "7" or "0007"), so that every epoch has
    exactly one directory.
    """
    # isascii and isdigit: the digits 0-9 only (str.isdigit alone accepts "٣")
    if not (name.isascii() and name.isdigit()):
        return None
    epoch = int(name)
    return epoch if epoch >= 1 and epoch_dirname(epoch) == name else None


def step_dirname(epoch: int, batch: int) -> str:
    """The directory name of a step checkpoint after `epoch` completed epochs and
    `batch` batches of the next one (J["epoch"], J["batch"]): "002.000150"."""
    return "%03d.%06d" % (epoch, batch)


def parse_step_dirname(name: str) -> tuple[int, int] | None:
    """(epochs completed, batches) of a step checkpoint's directory name, or None.

    Only canonical names count, as for epochs; a step checkpoint holds at least one
    batch (batch 0 is the epoch-end checkpoint of `epochs/`).
    """
    epoch_text, dot, batch_text = name.partition(".")
    if not (dot and (epoch_text + batch_text).isascii() and (epoch_text + batch_text).isdigit()):
        return None
    epoch, batch = int(epoch_text), int(batch_text)
    if batch < 1 or step_dirname(epoch, batch) != name:
        return None
    return epoch, batch


class CheckpointLayout:
    """The paths of one checkpoint tree rooted at `ckpt_directory`.

    Args:
        ckpt_directory: the top directory, absolute or relative (to the current
            directory at construction time; it is made absolute once here): it holds
            ckpt.log, and is what `candle-ckpt DIR` and every remedy name.
        tree: the directory holding `epochs/`, `last` and `best`: by default
            `<ckpt_directory>/ckpts`; `ckpt_directory` itself for upstream CANDLE's layout.
    """

    def __init__(
        self, ckpt_directory: str | os.PathLike[str], tree: str | os.PathLike[str] | None = None
    ) -> None:
        self.root = os.path.abspath(os.fspath(ckpt_directory))
        self.log_file = os.path.join(self.root, LOG_FILE)
        self.ckpts = (
            os.path.join(self.root, "ckpts") if tree is None else os.path.abspath(os.fspath(tree))
        )
        self.work = os.path.join(self.ckpts, "work")
        self.trash = os.path.join(self.ckpts, "trash")
        self.epochs = os.path.join(self.ckpts, "epochs")
        self.steps = os.path.join(self.ckpts, "steps")

    def __repr__(self) -> str:
        return f"CheckpointLayout({self.root!r})"

    def check_can_hold_a_tree(self) -> None:
        """Refuse a `ckpt_directory` that no tree can be written under, before anything is.

        The root, or the nearest part of its path that exists, must be a directory, and so
        must `ckpts/` where it exists: otherwise the first write (ckpt.log, the lock) would
        fail with a bare FileExistsError or NotADirectoryError naming no parameter.

        Raises:
            ParameterValueError: naming the path that is not a directory and the remedy.
        """
        path = self.root
        while not os.path.lexists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        if os.path.isdir(path) and os.path.lexists(self.ckpts):
            path = self.ckpts
        if not os.path.isdir(path):
            found = "a file" if os.path.exists(path) else "a dangling symlink"
            raise ParameterValueError(
                f"parameter 'ckpt_directory': '{self.root}' cannot hold a checkpoint tree: "
                f"'{path}' is {found}, expected a directory. Give --ckpt_directory a "
                f"directory (or a path to create one at), or move '{path}' away"
            )

    def link(self, name: str) -> str:
        """The path of the `last` or `best` link."""
        return os.path.join(self.ckpts, name)

    def epoch_dir(self, epoch: int) -> str:
        """The directory of a 1-based epoch."""
        return os.path.join(self.epochs, epoch_dirname(epoch))

    def step_dir(self, epoch: int, batch: int) -> str:
        """The directory of the step checkpoint after `epoch` epochs and `batch` batches."""
        return os.path.join(self.steps, step_dirname(epoch, batch))

    def checkpoint_dir(self, epoch: int, batch: int = 0) -> str:
        """The directory of a checkpoint: an epoch's (`batch` 0) or a step checkpoint's."""
        return self.step_dir(epoch, batch) if batch else self.epoch_dir(epoch)

    def list_steps(self) -> list[tuple[int, int]]:
        """The step checkpoints present in `steps/`, oldest first."""
        try:
            names = os.listdir(self.steps)
        except FileNotFoundError:
            return []
        return sorted(step for step in map(parse_step_dirname, names) if step is not None)

    def resolve_step_link(self) -> tuple[int, int] | None:
        """(epochs completed, batches) of the step checkpoint `last_step` names, or None
        when the link is absent or dangling (the step checkpoint was pruned).

        Raises:
            LinkError: the link is not a link, or resolves to anything but a directory
                directly inside `ckpts/steps/` with a step checkpoint's name.
        """
        path = self.link(STEP_LINK)
        if not os.path.lexists(path):
            return None
        expected = "expected a link to steps/NNN.BBBBBB"
        if not os.path.islink(path):
            raise LinkError(f"'{path}' is not a symlink; {expected}")
        try:
            target = os.path.realpath(path, strict=True)
        except FileNotFoundError:
            return None
        except OSError as error:  # ELOOP
            raise LinkError(
                f"'{path}' -> '{os.readlink(path)}' cannot be resolved ({error.strerror}); "
                f"{expected}"
            ) from None
        step = parse_step_dirname(os.path.basename(target))
        if (
            os.path.dirname(target) != os.path.realpath(self.steps)
            or step is None
            or not os.path.isdir(target)
        ):
            raise LinkError(
                f"'{path}' -> '{os.readlink(path)}' resolves to '{target}', which is not "
                f"a step checkpoint directory of '{self.steps}'; {expected}"
            )
        return step

    def relative_epoch_target(self, epoch: int) -> str:
        """What `last`/`best` store to point at an epoch: relative, so the tree can move."""
        return os.path.join("epochs", epoch_dirname(epoch))

    def list_epochs(self) -> list[int]:
        """The epochs present in `epochs/`, in numeric order (1000 after 999)."""
        try:
            names = os.listdir(self.epochs)
        except FileNotFoundError:
            return []
        return sorted(epoch for epoch in map(parse_epoch_dirname, names) if epoch is not None)

    def resolve_link(self, name: str) -> int | None:
        """The epoch a `last`/`best` link points at, or None if there is none.

        A link written by hand, relative or absolute, is accepted when it resolves to a
        directory directly inside `ckpts/epochs/`. A missing or dangling link means "no
        checkpoint" (None).

        Raises:
            LinkError: the link resolves outside `ckpts/epochs/`, to something that is
                not an epoch directory, or loops.
        """
        path = self.link(name)
        if not os.path.lexists(path):
            return None
        if not os.path.islink(path):
            kind = "directory" if os.path.isdir(path) else "file"
            raise LinkError(
                f"'{path}' is not a symlink; expected a link to epochs/NNN (found a {kind})"
            )
        try:
            target = os.path.realpath(path, strict=True)
        except FileNotFoundError:
            return None  # dangling: the epoch it named was deleted
        except OSError as error:  # ELOOP
            raise LinkError(
                f"'{path}' -> '{os.readlink(path)}' cannot be resolved "
                f"({error.strerror}); expected a link to epochs/NNN"
            ) from None
        epochs_real = os.path.realpath(self.epochs)
        if os.path.dirname(target) != epochs_real:
            raise LinkError(
                f"'{path}' -> '{os.readlink(path)}' resolves to '{target}', "
                f"outside '{epochs_real}'; expected a link to epochs/NNN"
            )
        epoch = parse_epoch_dirname(os.path.basename(target))
        if epoch is None or not os.path.isdir(target):
            raise LinkError(
                f"'{path}' -> '{os.readlink(path)}' resolves to '{target}', "
                f"which is not an epoch directory; expected epochs/NNN"
            )
        return epoch
