"""What readers that know nothing of step checkpoints do with a tree that has one.

The previous release (c7e8069, the code step checkpoints were added to) is run from its
own source, extracted with `git archive`; upstream CANDLE's restart (candle_lib's
`CandleCkpt.restart`) is emulated as candle_lib/ckpt_utils.py does it: follow
`ckpts/last`, read its ckpt-info.json, train from epoch `J["epoch"]`. Both find `last`
naming the last epoch-end checkpoint, so they train the partial epoch again from its
first batch; neither skips it, neither fails. docs/FORMAT.md, "Step checkpoints".
"""

import json
import os
import subprocess
import sys

import pytest
from test_steps_crash import command, environment, final_digest, reference, trained  # noqa: F401

pytest.importorskip("torch")

PREVIOUS = "c7e8069"
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory):
    """The previous release's source tree, or skip when this checkout has no history."""
    where = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(
        ["git", "-C", TOP, "archive", PREVIOUS], capture_output=True, timeout=120
    )
    if archive.returncode != 0:
        pytest.skip(f"git archive {PREVIOUS} failed: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    imported = subprocess.run(
        [sys.executable, "-c", "import candle_ckpt; print(candle_ckpt.__file__)"],
        env=environment(PYTHONPATH=str(where)),
        capture_output=True,
        text=True,
        check=True,
        cwd=str(where),  # not this checkout, which `-c` and `-m` would import first
    )
    assert imported.stdout.startswith(str(where)), imported.stdout  # not this release
    return str(where)


def run_with(code, root, *flags, status=0):
    done = subprocess.run(
        command(root, *flags),
        env=environment(PYTHONPATH=code),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == status, done.stderr[-3000:]
    return done


def candle_lib_restart_epoch(tree):
    """candle_lib's restart: J["epoch"] of `last`'s ckpt-info.json, if last/model.h5 exists."""
    last = os.path.join(tree, "last")
    if not os.path.exists(os.path.join(last, "model.h5")):
        return None
    with open(os.path.join(last, "ckpt-info.json")) as stream:
        return json.load(stream)["epoch"]


@pytest.mark.slow
def test_the_previous_release_and_candle_lib_train_the_partial_epoch_again(
    tmp_path,
    previous_release,
    reference,  # noqa: F811
):
    steps = ("--ckpt_save_steps", "4")
    killed = subprocess.run(
        command(tmp_path, *steps, "--kill_at", "2:10"), env=environment(), capture_output=True
    )
    assert killed.returncode == -9
    tree = os.path.join(tmp_path, "ckpts")
    assert os.readlink(os.path.join(tree, "last")) == "epochs/001"
    assert os.readlink(os.path.join(tree, "last_step")) == "steps/001.000008"

    # candle_lib restarts from epoch 1: its loop starts epoch 2 at its first batch
    assert candle_lib_restart_epoch(tree) == 1

    # the previous release: list and verify show the epochs and pass
    for args in (["list", str(tmp_path)], ["verify", str(tmp_path), "--all"]):
        # (`-m` imports from the current directory first: the previous release's)
        shown = subprocess.run(
            [sys.executable, "-m", "candle_ckpt", *args],
            env=environment(PYTHONPATH=previous_release),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=previous_release,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "step" not in shown.stdout  # epochs only
    # its restart loads epoch 1 and trains all of epoch 2 again (it knows no
    # ckpt_save_steps: refused as an unknown parameter, so not given), exactly
    done = run_with(previous_release, tmp_path)
    assert trained(done.stdout)[0] == (2, 0)
    assert final_digest(done.stdout) == reference
    assert os.readlink(os.path.join(tree, "last")) == "epochs/003"

    # this release: the step checkpoint continues epoch 1's, not the epoch 3 the
    # previous release saved since: ignored, with a warning
    done = run_with(TOP, tmp_path, *steps)
    assert trained(done.stdout) == [] and final_digest(done.stdout) == reference
    log = open(os.path.join(tmp_path, "ckpt.log")).read()
    assert "step checkpoint" in log and "continues the checkpoint of epoch 1, but 'last'" in log

    # the previous release's rollback to epoch 1 leaves last_step: the step checkpoint
    # continues epoch 1's again, and this release resumes it (later in the same
    # training: nothing skipped)
    rolled = subprocess.run(
        [sys.executable, "-m", "candle_ckpt", "rollback", str(tmp_path), "1"],
        env=environment(PYTHONPATH=previous_release),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=previous_release,
    )
    assert rolled.returncode == 0 and "last_step" not in rolled.stdout, rolled.stderr
    assert os.readlink(os.path.join(tree, "last_step")) == "steps/001.000008"
    done = run_with(TOP, tmp_path, *steps)
    assert trained(done.stdout)[0] == (2, 8) and final_digest(done.stdout) == reference
