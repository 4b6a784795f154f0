"""Test-only fault injection: kill this process at a named step of the save protocol.

The crash tests set `CANDLE_CKPT_FAULT=<point>` or `<point>:<n>` in a training
subprocess; at the n-th time (default 1st) the protocol reaches that point the process
sends itself SIGKILL, hitting windows too narrow for a randomly timed kill. Without the
variable, `fault_point` is one string comparison.

Points, in protocol order: during_direct_write (the model file laid out and its first
large buffer written in place, `direct_io.write_at`), after_write (model written into
work/, not yet fsynced), after_fsync, after_info (ckpt-info.json written), after_index
(its line appended to ckpts/index.jsonl, before the rename), after_rename (epochs/NNN in
place, links not yet moved), between_links (one of `last` and `best` moved,
`protocol.repoint_links`), after_last (before the keep policy), after_trash_rename (an
epoch being deleted is in trash/ but not yet removed), after_step_link (a step
checkpoint in steps/ and named by last_step, the one it supersedes not yet moved away).
`candle-ckpt export`: export_written (the file under its temporary name, fsynced),
export_digest_removed (an old PATH.sha256 removed, PATH not yet replaced),
export_renamed (PATH in place, PATH.sha256 not yet written).
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "during_direct_write",
    "after_write",
    "after_fsync",
    "after_info",
    "after_index",
    "after_rename",
    "between_links",
    "after_last",
    "after_trash_rename",
)
STEP_POINTS = ("after_step_link",)  # reached by step checkpoints' saves only
EXPORT_POINTS = ("export_written", "export_digest_removed", "export_renamed")


def _parse(spec: str | None) -> tuple[str | None, int]:
    if not spec:
        return None, 0
    name, _, count = spec.partition(":")
    if name not in POINTS + STEP_POINTS + EXPORT_POINTS:
        raise ValueError(
            f"CANDLE_CKPT_FAULT={spec!r}: unknown point {name!r}; "
            f"expected one of {list(POINTS + STEP_POINTS + EXPORT_POINTS)}"
        )
    return name, int(count or 1)


_armed, _remaining = _parse(os.environ.get("CANDLE_CKPT_FAULT"))


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if the armed fault is `name` and its count is due."""
    global _remaining
    if name != _armed:
        return
    _remaining -= 1
    if _remaining == 0:
        os.kill(os.getpid(), signal.SIGKILL)
