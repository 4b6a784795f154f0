"""Which directory is a run's checkpoint tree: the one rule, for training and the CLI.

Two layouts exist. candle_ckpt's (the seed's) keeps the tree in `<ckpt_directory>/ckpts`
and ckpt.log beside it; upstream CANDLE (candle_lib) keeps `epochs/`, `last`, `best`
and ckpt.log in `ckpt_directory` itself, and a `ckpt_directory` of None means
`<output_dir>/ckpts`. The rule that serves both, so that a job switched from candle_lib
(or resubmitted with the other spelling of its path) finds the tree it wrote:

1. `ckpt_directory` None: `<output_dir>/ckpts`, or `./save` without `output_dir`
   (the default of the `ckpt_directory` parameter); call it D.
2. A *tree* is a directory holding `epochs/` or a `last` link. D itself, if it is
   one (candle_lib's layout); else `D/ckpts`, if it is one (the seed's).
3. No tree yet (a new run): D itself when it is named `ckpts`, else `D/ckpts`.
4. A tree at any other of D, `D/ckpts` and `D/ckpts/ckpts` than the one picked is
   refused, naming both paths and what selects each, whatever `ckpt_restart_mode`:
   a run never starts afresh, or writes, next to a tree it did not pick. So is one at
   `<output_dir>/ckpts` when `ckpt_directory` is the default `./save` (candle_lib's
   default tree, which a benchmark that does not set `ckpt_directory` would otherwise
   leave behind).

ckpt.log is in D; `candle-ckpt` takes D (or anything this rule maps to the same tree).
"""

from __future__ import annotations

import os

from ..errors import ParameterValueError
from .layout import DEFAULT_CKPT_DIRECTORY, CheckpointLayout

TYPE_CHECKING = False  # typing's, without importing typing: the CLI's `list` uses this
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

TREE_DIR = "ckpts"


def is_tree(directory: str) -> bool:
    """Whether `directory` holds a checkpoint tree of either layout (`epochs/` or `last`)."""
    return os.path.isdir(os.path.join(directory, "epochs")) or os.path.lexists(
        os.path.join(directory, "last")
    )


def run_layout(settings: Mapping[str, Any]) -> CheckpointLayout:
    """The layout of the run the validated parameters `settings` describe (the rule
    above, from `ckpt_directory` and `output_dir`).

    Raises:
        ParameterValueError: a tree exists where the rule did not look first, or the
            directory cannot hold a tree (`CheckpointLayout.check_can_hold_a_tree`).
    """
    layout = _layout_by_the_rule(settings)
    layout.check_can_hold_a_tree()
    return layout


def _layout_by_the_rule(settings: Mapping[str, Any]) -> CheckpointLayout:
    directory, output_dir = settings["ckpt_directory"], settings.get("output_dir")
    if directory == DEFAULT_CKPT_DIRECTORY and output_dir is not None:
        # the default, most likely not chosen: candle_lib's default tree must not be
        # left behind for a new one in ./save
        upstream = os.path.join(output_dir, TREE_DIR)
        return locate(directory, f"ckpt_directory={directory!r} (the default)", upstream)
    if directory is not None:
        return locate(directory, f"ckpt_directory={directory!r}")
    if output_dir is None:
        return locate(DEFAULT_CKPT_DIRECTORY, "ckpt_directory None and no output_dir")
    return locate(
        os.path.join(output_dir, TREE_DIR),
        f"ckpt_directory None with output_dir={output_dir!r} (upstream CANDLE's "
        f"<output_dir>/ckpts)",
    )


def locate(
    directory: str | os.PathLike[str], selected_by: str, elsewhere: str | None = None
) -> CheckpointLayout:
    """The layout the rule gives `directory` (D); `selected_by` says, for messages,
    which parameters chose D; `elsewhere`, one more place where a tree is refused.

    Raises:
        ParameterValueError: trees at two of the places the rule looks.
    """
    root = os.path.abspath(os.fspath(directory))
    candidates = [root, os.path.join(root, TREE_DIR), os.path.join(root, TREE_DIR, TREE_DIR)]
    trees = [path for path in candidates if is_tree(path)]
    if trees and trees[0] != candidates[2]:
        picked = trees[0]
    else:
        picked = root if os.path.basename(root) == TREE_DIR else candidates[1]
    if elsewhere is not None and is_tree(elsewhere):
        trees.append(os.path.abspath(elsewhere))
    others = [path for path in trees if path != picked]
    if others:
        raise ParameterValueError(_two_trees(root, picked, others[0], selected_by))
    return CheckpointLayout(root, tree=picked)


def _two_trees(root: str, picked: str, other: str, selected_by: str) -> str:
    state = "the checkpoint tree" if is_tree(picked) else "a new checkpoint tree at"
    layout = (
        "upstream CANDLE's layout, epochs/ and last in the directory itself"
        if picked == root
        else "candle_ckpt's layout, <ckpt_directory>/ckpts"
    )
    return (
        f"two checkpoint trees where {selected_by} looks: it selects {state} "
        f"'{picked}' ({layout}), but a checkpoint tree also exists at '{other}' "
        f"(ckpt_directory={other!r} selects that one). Refusing to choose, so that no "
        f"run continues one or starts next to it and silently abandons the other. "
        f"Move the tree this run must not use elsewhere (e.g. mv '{other}' "
        f"'{other}.moved'), then rerun; 'candle-ckpt list DIR' shows what each holds"
    )
