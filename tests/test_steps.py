"""Step checkpoints (ckpt_save_steps): names, the trigger, the tree, J["batch"], in process.

The real-process tests (kill -9, the signal, the wall-clock stop) are in
tests/test_steps_crash.py.
"""

import os

import pytest

from candle_ckpt.core.errors import ParameterValueError
from candle_ckpt.core.format.layout import (
    CheckpointLayout,
    parse_step_dirname,
    step_dirname,
)
from candle_ckpt.core.save.steps import FIRST_AUTO_BATCHES, StepSchedule
from candle_ckpt.core.storage.trash import is_trash_name


class Log:
    def __init__(self):
        self.lines = []

    def info(self, message, *args):
        self.lines.append(message % args)


def test_step_names_are_canonical_and_sort_with_their_position():
    assert step_dirname(2, 150) == "002.000150"
    assert step_dirname(0, 1) == "000.000001"
    assert step_dirname(1000, 1234567) == "1000.1234567"
    for epoch, batch in [(0, 1), (2, 150), (1000, 1234567)]:
        assert parse_step_dirname(step_dirname(epoch, batch)) == (epoch, batch)
    for name in ["002", "002.0150", "2.000150", "002.000000", "002.00015x", "٠٠٢.000150", ""]:
        assert parse_step_dirname(name) is None, name
    assert is_trash_name("002.000150.0123456789ab")
    assert not is_trash_name("002.000150")


def test_list_steps_ignores_other_names(tmp_path):
    layout = CheckpointLayout(tmp_path)
    for name in ["001.000007", "000.000020", "junk", "001.7"]:
        os.makedirs(os.path.join(layout.steps, name))
    assert layout.list_steps() == [(0, 20), (1, 7)]


def test_fixed_interval_counts_batches_since_any_save():
    schedule = StepSchedule(3, 3.5, Log())
    due = []
    for _ in range(7):
        schedule.batch_ended(0.1)
        due.append(schedule.due())
        if due[-1]:
            schedule.saved(0.5)
    assert due == [False, False, True, False, False, True, False]


def test_auto_measures_one_save_then_saves_as_the_budget_allows():
    log = Log()
    schedule = StepSchedule("auto", 5.0, log)
    for _ in range(FIRST_AUTO_BATCHES - 1):
        schedule.batch_ended(0.1)
        assert not schedule.due()
    schedule.batch_ended(0.1)
    assert schedule.due()  # the first save, to measure its cost
    schedule.saved(0.2)  # 0.2 s at 5 %: one save per 4 s of training, 40 batches
    assert schedule.auto_interval() == 40
    assert "a save every 40 batches" in log.lines[-1]
    count = 0
    while not schedule.due():
        schedule.batch_ended(0.1)
        count += 1
    assert count == 40


def test_auto_logs_the_interval_only_when_it_changes_much():
    log = Log()
    schedule = StepSchedule("auto", 10.0, log)
    schedule.batch_ended(1.0)
    for cost in [1.0, 1.2, 0.9, 3.0]:
        schedule.saved(cost)
    assert [line.split(":")[1].split("(")[0].strip() for line in log.lines] == [
        "a save every 10 batches",
        "a save every 30 batches",
    ]


# -- a plain PyTorch loop, in process -------------------------------------------------

torch = pytest.importorskip("torch")


class Stop(Exception):
    pass


def loop(root, epochs, stop_at=None, steps=4, skip=True, **params):
    """tests/steps_job.py's loop, stopped by an exception after batch `stop_at` (E, B)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import steps_job

    import candle_ckpt

    torch.set_num_threads(1)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=data)
    y = x.sum(1, keepdim=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    shuffle = torch.Generator().manual_seed(7)
    order = steps_job.EpochOrder()
    params = {"ckpt_save_best": False, "ckpt_save_steps": steps, **params}
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {"ckpt_directory": str(root), "epochs": epochs, **params}, verbose=False
    )
    ckpt.set_model({"model": model, "optimizer": optimizer, "shuffle": shuffle, "order": order})
    J = ckpt.restart()
    start = J["batch"] if J and skip else 0
    trained = []
    for epoch in range(J["epoch"] if J else 0, epochs):
        if start == 0:
            order.order = torch.randperm(96, generator=shuffle)
        for batch in range(start, 12):
            rows = order.order[batch * 8 : (batch + 1) * 8]
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
            optimizer.step()
            trained.append((epoch + 1, batch))
            if (epoch + 1, batch) == stop_at:
                ckpt.finish()
                raise Stop
            ckpt.batch_end(batch)
        start = 0
        ckpt.ckpt_epoch(epoch, {"loss": 0.0})
    return J, trained, steps_job.digest(model, optimizer)


def test_a_loop_resumes_inside_the_epoch_exactly(tmp_path):
    _, _, expected = loop(tmp_path / "whole", 3)
    root = tmp_path / "cut"
    with pytest.raises(Stop):
        loop(root, 3, stop_at=(2, 9))
    layout = CheckpointLayout(root)
    assert layout.resolve_link("last") == 1
    assert layout.resolve_step_link() == (1, 8)  # batches 0-7 of epoch 2 saved
    assert layout.list_steps() == [(1, 8)]  # the step of batch 4 was superseded
    J, trained, digest = loop(root, 3)
    assert (J["epoch"], J["batch"], J["format_version"]) == (1, 8, 3)
    assert trained[0] == (2, 8)
    assert digest == expected
    assert layout.list_steps() == [] and not os.path.lexists(layout.link("last_step"))


def test_a_step_at_the_epochs_last_batch_resumes_at_the_next_epoch(tmp_path):
    _, _, expected = loop(tmp_path / "whole", 2)
    root = tmp_path / "cut"
    with pytest.raises(Stop):
        loop(root, 2, stop_at=(2, 0), steps=12, ckpt_save_interval=2)
    assert CheckpointLayout(root).resolve_step_link() == (0, 12)  # epoch 1 not saved
    J, trained, digest = loop(root, 2, steps=12, ckpt_save_interval=2)
    assert (J["epoch"], J["batch"]) == (0, 12) and trained[0] == (2, 0)
    assert digest == expected


def test_an_epoch_checkpoint_returns_batch_zero(tmp_path):
    loop(tmp_path, 1, steps=0)
    J, trained, _ = loop(tmp_path, 2, steps=0)
    assert (J["epoch"], J["batch"]) == (1, 0) and trained[0] == (2, 0)


def test_a_loop_that_does_not_skip_the_trained_batches_is_refused(tmp_path):
    with pytest.raises(Stop):
        loop(tmp_path, 2, stop_at=(1, 5))
    refused = r"first batch that ended is batch 0.*expected batch 4"
    with pytest.raises(ParameterValueError, match=refused):
        loop(tmp_path, 2, skip=False)
    J, trained, _ = loop(tmp_path, 2)  # refused before anything was saved: resumes
    assert (J["epoch"], J["batch"]) == (0, 4) and trained[0] == (1, 4)


def test_step_checkpoints_never_become_best_and_skip_epochs_holds(tmp_path):
    with pytest.raises(Stop):
        loop(tmp_path, 3, stop_at=(2, 6), ckpt_skip_epochs=3)
    layout = CheckpointLayout(tmp_path)
    assert layout.list_steps() == [] and layout.list_epochs() == []
    with pytest.raises(Stop):
        loop(tmp_path / "b", 3, stop_at=(2, 6), ckpt_save_best=True, ckpt_save_best_metric="loss")
    layout = CheckpointLayout(tmp_path / "b")
    assert layout.resolve_link("best") == 1 and layout.resolve_step_link() == (1, 4)


def test_a_corrupt_step_checkpoint_is_refused_then_falls_back_to_last(tmp_path):
    from candle_ckpt.core.errors import ChecksumMismatchError

    _, _, expected = loop(tmp_path / "whole", 3)
    root = tmp_path / "cut"
    with pytest.raises(Stop):
        loop(root, 3, stop_at=(2, 9))
    model = CheckpointLayout(root).step_dir(1, 8) + "/model.h5"
    with open(model, "r+b") as stream:
        stream.seek(os.path.getsize(model) // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumMismatchError, match="ckpt_restart_fallback.*last_step"):
        loop(root, 3)
    J, trained, digest = loop(root, 3, ckpt_restart_fallback=True)
    assert (J["epoch"], J["batch"]) == (1, 0) and trained[0] == (2, 0)
    assert digest == expected
    log = open(root / "ckpt.log").read()
    assert "STEP CHECKPOINT" in log and "IS UNUSABLE" in log and "FALLING BACK" in log


def test_a_run_without_ckpt_save_steps_resumes_from_last(tmp_path):
    _, _, expected = loop(tmp_path / "whole", 3)
    root = tmp_path / "cut"
    with pytest.raises(Stop):
        loop(root, 3, stop_at=(2, 9))
    J, trained, digest = loop(root, 3, steps=0)
    assert (J["epoch"], J["batch"]) == (1, 0) and trained[0] == (2, 0)
    assert digest == expected
    assert "is not resumed: ckpt_save_steps is 0" in open(root / "ckpt.log").read()


def test_the_operator_lists_verifies_rolls_back_and_prunes_step_checkpoints(tmp_path, capsys):
    import json

    from candle_ckpt.operator.cli import main

    def cli(*args):
        status = main([*args])
        return status, capsys.readouterr().out

    with pytest.raises(Stop):
        loop(tmp_path, 3, stop_at=(2, 9))
    status, out = cli("list", str(tmp_path))
    assert status == 0
    assert (
        "step checkpoint steps/001.000008 (epoch 2 after batch 8; last_step): a restart "
        "with ckpt_save_steps resumes here"
    ) in out
    listed = json.loads(cli("list", "--json", str(tmp_path))[1])["steps"]
    assert [(s["epoch"], s["batch"], s["resumed"]) for s in listed] == [(1, 8, True)]
    status, out = cli("verify", str(tmp_path), "--all")
    assert status == 0 and "epoch 1: ok" in out and "step steps/001.000008: ok" in out

    status, out = cli("rollback", str(tmp_path), "1")
    assert status == 0 and "removed last_step (was -> steps/001.000008)" in out
    assert "not named by last_step" in cli("list", str(tmp_path))[1]
    J, trained, _ = loop(tmp_path, 2)  # a rollback resumes at the epoch end
    assert (J["epoch"], J["batch"]) == (1, 0) and trained[0] == (2, 0)

    with pytest.raises(Stop):
        loop(tmp_path, 3, stop_at=(3, 5))  # a step of epoch 3 continues epoch 2's
    os.makedirs(CheckpointLayout(tmp_path).step_dir(1, 4))  # an unreadable one
    status, out = cli("prune", str(tmp_path), "--abandoned")
    assert status == 0
    assert "deleted 1 step checkpoint no restart resumes: steps/001.000004" in out
    assert CheckpointLayout(tmp_path).list_steps() == [(2, 4)]


def step_saves(root):
    import json

    with open(os.path.join(root, "ckpts", "history.jsonl")) as stream:
        lines = [json.loads(line) for line in stream]
    return [(line["epoch"], line["batch"]) for line in lines if line["kind"] == "step_saved"]


def test_no_step_save_at_an_epochs_last_batch_when_its_end_is_saved(tmp_path):
    loop(tmp_path, 3, ckpt_save_interval=2)
    # epoch 1: its length is not known yet; epoch 2 ends saved (interval): none at 12;
    # epoch 3 is the final one, saved
    assert step_saves(tmp_path) == [(0, 4), (0, 8), (0, 12), (1, 4), (1, 8), (2, 4), (2, 8)]


def test_auto_saves_within_the_budget_and_logs_the_interval(tmp_path):
    loop(tmp_path, 2, steps="auto", ckpt_save_overhead=50)
    saves = step_saves(tmp_path)
    assert saves[0] == (0, FIRST_AUTO_BATCHES)  # the first measures the cost
    log = open(tmp_path / "ckpt.log").read()
    assert "ckpt_save_steps auto: a save every" in log and "budget 50% of training" in log


def test_the_wall_clock_stop_at_a_batch_end_counts_the_next_batches_and_a_save():
    from candle_ckpt.core.run import walltime

    now = [1000.0]
    real, walltime.clock = walltime.clock, lambda: now[0]
    try:
        stop = walltime.WallClockStop(30, "+100", Log())
        stop.start()
        for _ in range(3):
            now[0] += 10  # a batch of 10 s
            stop.batch_ended()
        # no save timed yet: as long as all training so far (30 s)
        assert stop.should_stop_batch() is None  # 1030 + 10 + 30 + 30 = 1100: fits
        now[0] += 10
        stop.batch_ended()
        estimate = stop.should_stop_batch()
        assert estimate is not None and estimate.save_seconds == 40
        assert estimate.describe().startswith("the next 1 batch (10 s, from the longest")
        stop.step_save_ended(2.0)
        assert stop.should_stop_batch() is None  # 1040 + 10 + 2 + 30 = 1082
        assert stop.should_stop_batch(every=3) is not None  # 1040 + 30 + 2 + 30 = 1102
        now[0] += 5  # validation, the epoch end: 5 s between the epochs
        stop.batch_begins()
        assert stop.should_stop_batch() is None  # 1045 + 10 + 2 + 30 = 1087
        estimate = stop.should_stop_batch(epoch_ends=True)  # + 5 s, and in a new run
        assert estimate is None and list(stop.between_epochs) == [5]
        now[0] += 10
        stop.batch_ended()  # 1055 + 10 + 5 + 2 + 30 = 1102
        assert stop.should_stop_batch() is None
        estimate = stop.should_stop_batch(epoch_ends=True)
        assert estimate.describe().startswith("the next 1 batch and the epoch's end (15 s")
    finally:
        walltime.clock = real


def test_processes_that_would_resume_at_different_batches_all_fail():
    from candle_ckpt.core.errors import CheckpointError
    from candle_ckpt.core.restore.resume import Checkpoint
    from candle_ckpt.core.run.writer import agree_on_checkpoint

    found = Checkpoint(1, "/tree/ckpts/steps/001.000008", {"checksum": "77"}, memoryview(b""))
    step = Checkpoint(1, found.directory, found.info, found.model_contents, batch=8)
    assert agree_on_checkpoint(lambda mine: [mine, (1, 8, 77)], lambda: step) is step
    for other in [(1, 4, 77), (1, 0, 77)]:  # another batch; the epoch's end
        with pytest.raises(CheckpointError, match=r"\(epoch, batch, model CRC32\)"):
            agree_on_checkpoint(lambda mine, other=other: [mine, other], lambda: step)
