"""Deleting a directory of a checkpoint tree in two steps: out of sight, then removed.

A directory to delete (a leftover `work/`, an epoch the keep policy or `prune` drops,
an epoch a re-save replaces) is first renamed into `ckpts/trash/` under a name no
reader takes for an epoch, `<name>.<12 hex digits>`: one durable rename, after which
no reader sees it and nothing was deleted yet. Removing it, which can be slow, follows
in the background (`background.TrashCollector`) or at once (`discard_tree`). A crash in
between leaves it in the trash, which the next writer empties.

Every step goes through descriptors of directories reached without following a link
(core/storage/tree_fs.py): what is moved must be a real directory, `trash/` must be a real
directory of the tree, and the collector removes only entries with the names it gives
(a link among them is removed itself, never what it points to), each by a
descriptor-walking `rmtree` (`durable.remove_tree`).
"""

from __future__ import annotations

import os
import re
import uuid

from ..format.layout import CheckpointLayout
from . import durable, tree_fs
from .faults import fault_point

# What `move_to_trash` names an entry: the directory's own name ("work", an epoch's or
# a step checkpoint's) and a random suffix, so two deletions of one never collide.
_TRASH_NAME = re.compile(r"(work|[0-9]{3,}|[0-9]{3,}\.[0-9]{6,})\.[0-9a-f]{12}\Z")


def is_trash_name(name: str) -> bool:
    """Whether `name`, an entry of `trash/`, is one `move_to_trash` gave."""
    return _TRASH_NAME.match(name) is not None


def move_to_trash(layout: CheckpointLayout, path: str) -> str | None:
    """Rename the directory `path` of the tree into `trash/` durably; return its new
    name there, or None when `path` does not exist.

    Raises:
        UnsafePathError: `path`, a directory on the way to it, or `trash/` is a link or
            not a directory (nothing is moved).
    """
    with tree_fs.directory(layout.root, os.path.dirname(path)) as parent:
        name = os.path.basename(path)
        if tree_fs.require_directory(parent, name, path) is None:
            return None
        with tree_fs.directory(layout.root, layout.trash, create=True) as trash:
            moved = f"{name}.{uuid.uuid4().hex[:12]}"
            try:
                durable.rename_at(parent, name, trash, moved)
            except FileNotFoundError:
                return None
    fault_point("after_trash_rename")
    return moved


def discard_tree(layout: CheckpointLayout, path: str) -> str | None:
    """Delete the directory `path` of the tree now, so that no reader ever sees it
    half-deleted: `move_to_trash`, then remove it there. A crash leaves either the
    whole directory at `path` or a leftover in `trash/`, which `empty_trash` finishes.
    Returns its name in the trash, or None when `path` did not exist."""
    moved = move_to_trash(layout, path)
    if moved is not None:
        with tree_fs.directory(layout.root, layout.trash) as trash:
            durable.remove_tree(trash, moved)
    return moved


def empty_trash(layout: CheckpointLayout) -> tuple[list[str], list[str]]:
    """Finish the deletions in `trash/`: remove every entry `move_to_trash` named.

    Returns (the names removed, the names left because the library did not give them).

    Raises:
        UnsafePathError: `trash/` (or `ckpts/`) is a link or not a directory.
        OSError: a removal failed (the rest is left for the next call).
    """
    try:
        trash = tree_fs.open_directory(layout.root, layout.trash)
    except FileNotFoundError:
        return [], []
    try:
        names = sorted(os.listdir(trash))
        removed = [name for name in names if is_trash_name(name)]
        for name in removed:
            durable.remove_tree(trash, name)
    finally:
        os.close(trash)
    return removed, [name for name in names if not is_trash_name(name)]
