"""Killed with SIGKILL at every step of the save protocol: `last` is always complete.

A subprocess saves epochs with a plain-file writer (laid out, then written in place by
`direct_io.write_at`, as the Keras h5 writer does) and kills itself at a named fault
point (candle_ckpt.core.storage.faults); afterwards `last` must resolve to an epoch whose
ckpt-info.json validates and whose files verify, and a new run must finish the job.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import file_writer
from test_index import rows

from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.logs import silent_logger
from candle_ckpt.core.params import validate_params
from candle_ckpt.core.restore.resume import find_checkpoint
from candle_ckpt.core.save.checkpointer import Checkpointer
from candle_ckpt.core.storage.faults import POINTS
from candle_ckpt.operator.inventory import survey

JOB = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    from candle_ckpt.core.save.checkpointer import Checkpointer
    from conftest import direct_writer
    checkpointer = Checkpointer({{"epochs": 6, "ckpt_directory": {root!r}, "ckpt_keep_limit": 2,
                                 "ckpt_save_best_metric": "loss"}}, verbose=False)
    for epoch in range(1, 7):
        checkpointer.epoch_end(epoch, {{"loss": 1.0 / epoch}}, direct_writer(os.urandom(100000)))
""")


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("hit", [1, 3])
def test_kill_at_each_protocol_step_leaves_last_complete(tmp_path, point, hit):
    root = str(tmp_path / "save")
    code = JOB.format(tests=os.path.dirname(os.path.abspath(__file__)), root=root)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "CANDLE_CKPT_FAULT": f"{point}:{hit}"},
    )
    assert result.returncode == -9, result.stderr
    layout = CheckpointLayout(root)
    settings = validate_params({"ckpt_directory": root, "ckpt_restart_mode": "auto"})
    found = find_checkpoint(layout, settings, silent_logger())
    if found is not None:  # verified: ckpt-info.json valid, every CRC32 matches
        assert found.info["epoch"] in layout.list_epochs()
    else:
        assert (
            point
            in (
                "during_direct_write",
                "after_write",
                "after_fsync",
                "after_info",
                "after_index",
                "after_rename",
                "between_links",
            )
            and hit == 1
        )
    # `list` shows with the index what it shows without (tests/test_index.py)
    assert rows(survey(layout)) == rows(survey(layout, use_index=False))
    # the next run cleans up and finishes
    checkpointer = Checkpointer(
        {
            "epochs": 6,
            "ckpt_directory": root,
            "ckpt_keep_limit": 2,
            "ckpt_save_best_metric": "loss",
        },
        verbose=False,
    )
    start = found.info["epoch"] + 1 if found else 1
    if found:
        checkpointer.resume(found.info)
    for epoch in range(start, 7):
        checkpointer.epoch_end(epoch, {"loss": 1.0 / epoch}, file_writer(b"x"))
    assert layout.resolve_link("last") == 6 and layout.resolve_link("best") == 6
    checkpointer.trash.wait()
    assert not os.path.exists(layout.work)
    assert not os.path.exists(layout.trash) or os.listdir(layout.trash) == []
    assert not [name for name in os.listdir(layout.ckpts) if ".tmp." in name]
