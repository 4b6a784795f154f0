"""Which step checkpoint continues `last`: the one rule, for the restart and the operator.

A step checkpoint (`steps/EEE.BBBBBB`, docs/FORMAT.md "Step checkpoints") records in
`after_last` the checkpoint `last` named when it was saved: its epoch and the CRC32 of
its ckpt-info.json's bytes. It continues `last` while `last` names that same
checkpoint; once anything moved `last` (a save, a rollback, a release or candle_lib
that knows nothing of step checkpoints), it is superseded: a restart ignores it and
a prune deletes it.

Light on imports (no validation): `candle-ckpt list` uses `survey_steps`.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping

from ..errors import LinkError
from .info_keys import MAX_INFO_BYTES
from .layout import INFO_FILE, CheckpointLayout

TYPE_CHECKING = False  # typing's, without importing typing (see info_keys.py)
if TYPE_CHECKING:
    from typing import Any


def info_file_crc32(directory: str) -> str | None:
    """The CRC32 of the bytes of `<directory>/ckpt-info.json` as they are on disk (None
    when it cannot be read): which checkpoint of an epoch a step checkpoint continues,
    whichever writer wrote it."""
    try:
        with open(os.path.join(directory, INFO_FILE), "rb") as stream:
            return str(zlib.crc32(stream.read(MAX_INFO_BYTES + 1)))
    except OSError:
        return None


def last_identity(layout: CheckpointLayout) -> dict[str, Any]:
    """The checkpoint `last` names now, as `after_last` records it: {"epoch": its epoch,
    or None when there is no usable `last`; "crc32": of its ckpt-info.json's bytes}."""
    try:
        epoch = layout.resolve_link("last")
    except LinkError:
        epoch = None
    if epoch is None:
        return {"epoch": None, "crc32": None}
    return {"epoch": epoch, "crc32": info_file_crc32(layout.epoch_dir(epoch))}


def continues(after_last: Mapping[str, Any], identity: Mapping[str, Any]) -> bool:
    """Whether a step checkpoint whose `after_last` is given continues the checkpoint
    `identity` (`last_identity`) names."""
    return (after_last["epoch"], after_last["crc32"]) == (identity["epoch"], identity["crc32"])


class StepState:
    """One step checkpoint directory as an operator sees it (`survey_steps`).

    `continues_last` is None when its ckpt-info.json cannot be read (`problem` says
    why); `named` whether `last_step` names it.
    """

    __slots__ = ("after_epoch", "batch", "continues_last", "directory", "epoch", "named", "problem")

    def __init__(
        self,
        epoch: int,
        batch: int,
        directory: str,
        named: bool,
        after_epoch: int | None,
        continues_last: bool | None,
        problem: str | None,
    ) -> None:
        self.epoch, self.batch, self.directory, self.named = epoch, batch, directory, named
        self.after_epoch, self.continues_last, self.problem = after_epoch, continues_last, problem

    @property
    def resumed(self) -> bool:
        """Whether a restart (with ckpt_save_steps) resumes from it, if it verifies."""
        return self.named and bool(self.continues_last)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__} | {"resumed": self.resumed}

    def describe(self, root: str) -> str:
        """One line for `list`: where, which batch, and what a restart does with it."""
        where = os.path.relpath(self.directory, root)
        position = f"epoch {self.epoch + 1} after batch {self.batch}"
        if self.problem is not None:
            return f"step checkpoint {where} ({position}): unreadable: {self.problem}"
        if self.resumed:
            return (
                f"step checkpoint {where} ({position}; last_step): a restart with "
                f"ckpt_save_steps resumes here"
            )
        why = (
            "not named by last_step (a rollback unlinked it, or a save was interrupted)"
            if self.continues_last
            else f"superseded: it continues epoch {self.after_epoch}'s checkpoint, "
            f"which 'last' no longer names"
        )
        prune = "'candle-ckpt prune --abandoned' deletes it"
        return f"step checkpoint {where} ({position}): {why}; {prune}"


def survey_steps(layout: CheckpointLayout) -> list[StepState]:
    """Every step checkpoint of the tree, oldest first, without validating anything."""
    steps = layout.list_steps()
    if not steps:
        return []
    identity = last_identity(layout)
    try:
        named = layout.resolve_step_link()
    except LinkError:
        named = None
    states = []
    for epoch, batch in steps:
        directory = layout.step_dir(epoch, batch)
        after_epoch, continuing, problem = None, None, None
        try:
            with open(os.path.join(directory, INFO_FILE), "rb") as stream:
                after = json.loads(stream.read(MAX_INFO_BYTES + 1))["after_last"]
            after_epoch, continuing = after["epoch"], continues(after, identity)
        except FileNotFoundError as error:
            if not os.path.isdir(directory):
                continue  # pruned since the listing
            problem = f"{os.path.join(directory, INFO_FILE)}: {error.strerror}"
        except (OSError, ValueError, KeyError, TypeError) as error:
            problem = f"{os.path.join(directory, INFO_FILE)}: {error!r}"
        states.append(
            StepState(
                epoch, batch, directory, named == (epoch, batch), after_epoch, continuing, problem
            )
        )
    return states
