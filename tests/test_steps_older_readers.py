"""What readers that know nothing of step checkpoints do with a tree that has one.

The previous release (c7e8069, the code step checkpoints were added to) is run from its
own source, extracted with `git archive`; upstream CANDLE's restart (candle_lib's
`CandleCkpt.restart`) is emulated as candle_lib/ckpt_utils.py does it: follow
`ckpts/last`, read its ckpt-info.json, train from epoch `J["epoch"]`. Both find `last`
naming the last epoch-end checkpoint: candle_lib trains the partial epoch again from
its first batch; the previous release's commands see the epochs only, and its restart
refuses this release's PyTorch model file (torch-h5/2) before loading anything. Neither
skips a batch. docs/FORMAT.md, "Step checkpoints" and the PyTorch model file.
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


def killed_mid_epoch(root, epoch):
    """A run with step checkpoints killed at batch 10 of `epoch` (1-based): `last` names
    epoch `epoch - 1`, `last_step` its step after batch 8; returns the tree."""
    killed = subprocess.run(
        command(root, *STEPS, "--kill_at", f"{epoch}:10"), env=environment(), capture_output=True
    )
    assert killed.returncode == -9
    tree = os.path.join(root, "ckpts")
    assert os.readlink(os.path.join(tree, "last")) == f"epochs/{epoch - 1:03d}"
    assert os.readlink(os.path.join(tree, "last_step")) == f"steps/{epoch - 1:03d}.000008"
    return tree


def previous_cli(previous_release, *args):
    # (`-m` imports from the current directory first: the previous release's)
    return subprocess.run(
        [sys.executable, "-m", "candle_ckpt", *args],
        env=environment(PYTHONPATH=previous_release),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=previous_release,
    )


STEPS = ("--ckpt_save_steps", "4")


@pytest.mark.slow
def test_the_previous_release_sees_epochs_only_and_candle_lib_trains_the_partial_epoch_again(
    tmp_path,
    previous_release,
    reference,  # noqa: F811
):
    tree = killed_mid_epoch(tmp_path, 3)

    # candle_lib restarts from epoch 2: its loop starts epoch 3 at its first batch
    assert candle_lib_restart_epoch(tree) == 2

    # the previous release: list and verify show the epochs and pass
    for args in (["list", str(tmp_path)], ["verify", str(tmp_path), "--all"]):
        shown = previous_cli(previous_release, *args)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "step" not in shown.stdout  # epochs only
    # its restart refuses this release's torch-h5/2 model file before loading anything
    # (docs/FORMAT.md, the PyTorch model file's version step), naming the version
    # (it knows no ckpt_save_steps: refused as an unknown parameter, so not given)
    refused = run_with(previous_release, tmp_path, status=1)
    assert "candle_ckpt_torch_format_version is" in refused.stderr
    assert "reads versions 1 to 1" in refused.stderr
    assert trained(refused.stdout) == []
    assert os.readlink(os.path.join(tree, "last")) == "epochs/002"

    # its rollback to epoch 1 leaves last_step, whose step continues epoch 2's: this
    # release ignores it with a warning and trains epoch 2 again from its first batch
    rolled = previous_cli(previous_release, "rollback", str(tmp_path), "1")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert os.readlink(os.path.join(tree, "last_step")) == "steps/002.000008"
    done = run_with(TOP, tmp_path, *STEPS)
    assert trained(done.stdout)[0] == (2, 0) and final_digest(done.stdout) == reference
    log = open(os.path.join(tmp_path, "ckpt.log")).read()
    assert "step checkpoint" in log and "continues the checkpoint of epoch 2, but 'last'" in log


@pytest.mark.slow
def test_a_rollback_by_the_previous_release_to_the_epoch_last_names_keeps_the_step(
    tmp_path,
    previous_release,
    reference,  # noqa: F811
):
    """The previous release's rollback to the very epoch `last` names leaves last_step:
    the step continues that epoch's checkpoint, and this release resumes it (later in
    the same training: nothing skipped)."""
    tree = killed_mid_epoch(tmp_path, 2)
    rolled = previous_cli(previous_release, "rollback", str(tmp_path), "1")
    assert rolled.returncode == 0 and "last_step" not in rolled.stdout, rolled.stderr
    assert os.readlink(os.path.join(tree, "last_step")) == "steps/001.000008"
    done = run_with(TOP, tmp_path, *STEPS)
    assert trained(done.stdout)[0] == (2, 8) and final_digest(done.stdout) == reference
