"""The keep-policy scenario of test_policies: kill, restart, rollback, in one tree.

Run as a script it prints, as JSON, the epochs on disk after each phase for each keep
mode; `tests/test_policies.py` holds what candle_ckpt 0.2 (format 1, `epochs_saved`)
printed, and checks that format 2 keeps exactly the same sets::

    PYTHONPATH=<checkout> python tests/keep_scenario.py DIR

Only the public `Checkpointer` API of both versions is used. A kill is a fault raised
at `after_last` (the epoch saved and linked, its keep policy not yet applied): what a
SIGKILL there leaves on disk, without killing the test process.
"""

import json
import os
import sys

from candle_ckpt.core.format.info import read_info
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.save import checkpointer as checkpointer_module
from candle_ckpt.core.save.checkpointer import Checkpointer
from candle_ckpt.core.save.protocol import point_link

MODES = {"linear": 3, "exponential": 4, "all": 1}


class Killed(Exception):
    pass


def _writer(directory):
    with open(os.path.join(directory, "model.h5"), "wb") as stream:
        stream.write(b"weights")
    return "model.h5"


def _loss(epoch, run):
    # Improves at epochs 2 and 7 of each run, else worse: `best` lags behind `last`.
    return {2: 0.5, 7: 0.2}.get(epoch, 1.0 + epoch / 100) + run / 1000


def _train(root, mode, epochs, run, *, resume_from=None, kill_at_save=None, interval=1):
    params = {
        "ckpt_directory": root,
        "epochs": 40,
        "ckpt_save_best_metric": "loss",
        "ckpt_keep_mode": mode,
        "ckpt_keep_limit": MODES[mode],
        "ckpt_save_interval": interval,
    }
    checkpointer = Checkpointer(params, logger=None)
    layout = CheckpointLayout(root)
    if resume_from is not None:
        checkpointer.resume(read_info(layout.epoch_dir(resume_from)))
    saves = [0]
    original = checkpointer_module.fault_point

    def fault(name):
        if name == "after_last":
            saves[0] += 1
            if saves[0] == kill_at_save:
                raise Killed
        original(name)

    checkpointer_module.fault_point = fault
    try:
        for epoch in epochs:
            checkpointer.epoch_end(epoch, {"loss": _loss(epoch, run)}, _writer)
    except Killed:
        pass
    finally:
        checkpointer_module.fault_point = original
    checkpointer.trash.wait()
    return layout


def scenario(top):
    """{mode: {phase: epochs on disk}} for each keep mode."""
    found = {}
    for mode in MODES:
        root = os.path.join(top, mode)
        phases = {}
        # an earlier, unrelated run: every 3rd epoch up to 24, all kept
        layout = _train(root, "all", range(1, 25), 0, interval=3)
        phases["earlier run"] = layout.list_epochs()
        # a run from scratch saving every 2nd epoch (so the earlier run's odd epochs stay
        # between its own), killed at its 6th save before the keep policy
        os.unlink(layout.link("last"))
        layout = _train(root, mode, range(1, 16), 1, kill_at_save=6, interval=2)
        phases["killed"] = layout.list_epochs()
        last = layout.resolve_link("last")
        # restarted from last, trains to 16
        layout = _train(root, mode, range(last + 1, 17), 2, resume_from=last, interval=2)
        phases["restarted"] = layout.list_epochs()
        # an operator rolls back to the newest kept epoch before 14, and the run goes on
        back = max(e for e in layout.list_epochs() if e < 14)
        point_link(layout, "best", None)
        point_link(layout, "last", back)
        layout = _train(root, mode, range(back + 1, 21), 3, resume_from=back)
        phases[f"rolled back to {back}"] = layout.list_epochs()
        # restarted once more, from the last epoch of that run
        layout = _train(root, mode, range(21, 26), 4, resume_from=20)
        phases["restarted again"] = layout.list_epochs()
        found[mode] = phases
    return found


if __name__ == "__main__":
    print(json.dumps(scenario(sys.argv[1])))
