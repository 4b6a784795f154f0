"""ckpts/history.jsonl: written by the writer, read past damage, timelines marked."""

import json
import os
import subprocess
import sys

import pytest
from conftest import file_writer

from candle_ckpt.core.format.history import HistoryWriter, read_history
from candle_ckpt.core.format.info import read_info
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.run.session import TrainingSession
from candle_ckpt.core.save.protocol import point_link

RUN = {"run_id": "a" * 32, "run_started": "2026-12-03T08:00:00Z", "lineage_id": "a" * 32}


def lines_of(ckpts):
    with open(os.path.join(ckpts, "history.jsonl")) as stream:
        return [json.loads(line) for line in stream]


def test_every_epoch_is_recorded_saved_or_not(make_checkpointer, ckpt_dir):
    checkpointer = make_checkpointer(epochs=4, ckpt_save_interval=2, ckpt_save_best=False)
    for epoch in range(1, 5):
        checkpointer.epoch_end(epoch, {"loss": 1.0 / epoch, "lr": float("nan")}, file_writer())
    lines = lines_of(checkpointer.layout.ckpts)
    assert [line["kind"] for line in lines] == [
        "start",
        "epoch",
        "epoch",
        "saved",
        "epoch",
        "epoch",
        "saved",
    ]
    assert lines[0]["resumed_from"] is None and lines[0]["run_id"] == checkpointer.run_id
    assert lines[1]["metrics"] == {"loss": 1.0, "lr": None}
    history = read_history(checkpointer.layout.ckpts)
    assert [(r.epoch, r.saved) for r in history.live] == [
        (1, False),
        (2, True),
        (3, False),
        (4, True),
    ]
    assert history.warnings == [] and history.metric_names == ["loss", "lr"]


def test_interval_zero_records_nothing(make_checkpointer, ckpt_dir):
    checkpointer = make_checkpointer(epochs=2, ckpt_save_interval=0)
    checkpointer.epoch_end(1, {"loss": 1.0}, file_writer())
    assert not os.path.exists(os.path.join(ckpt_dir, "ckpts", "history.jsonl"))


def test_restart_and_rollback_abandon_the_epochs_after_the_resumed_one(make_checkpointer, ckpt_dir):
    layout = CheckpointLayout(ckpt_dir)
    first = make_checkpointer(epochs=10)
    for epoch in range(1, 7):  # killed after epoch 6; last names epoch 6
        first.epoch_end(epoch, {"loss": 10.0 - epoch}, file_writer())
    point_link(layout, "best", 4)  # an operator rolls back to 4
    point_link(layout, "last", 4)
    second = make_checkpointer(epochs=10)
    second.resume(read_info(layout.epoch_dir(4)))
    for epoch in range(5, 11):
        second.epoch_end(epoch, {"loss": 1.0 / epoch}, file_writer())
    history = read_history(layout.ckpts)
    assert [r.epoch for r in history.live] == list(range(1, 11))
    assert {r.run_id for r in history.live[4:]} == {second.run_id}
    assert [(r.epoch, r.run_id) for r in history.epochs if r.abandoned] == [
        (5, first.run_id),
        (6, first.run_id),
    ]
    assert history.rewinds == [4]
    assert history.runs[1].resumed_from == 4 and history.runs[1].lineage_id == first.run_id


def train(checkpointer, epochs, loss=10.0):
    for epoch in epochs:
        checkpointer.epoch_end(epoch, {"loss": loss - epoch / 100}, file_writer())
    return checkpointer.run_id


def test_a_rollback_to_an_epoch_a_scratch_run_abandoned_makes_its_timeline_live(
    make_checkpointer, ckpt_dir
):
    """Issue 30: a run to 6, a run from scratch by mistake to 3, `rollback 6`: the live
    timeline is the one that led to epoch 6, as `last` says, and stays so as training
    resumes from it."""
    layout = CheckpointLayout(ckpt_dir)
    first = train(make_checkpointer(epochs=6), range(1, 7))
    scratch = train(make_checkpointer(epochs=3, ckpt_restart_mode="off"), range(1, 4), 20.0)
    assert [r.run_id for r in read_history(layout.ckpts, last=3).live] == [scratch] * 3
    point_link(layout, "last", 6)  # what `candle-ckpt rollback 6` does to the links
    history = read_history(layout.ckpts, last=6)
    assert [(r.epoch, r.run_id) for r in history.live] == [(e, first) for e in range(1, 7)]
    assert [(r.epoch, r.run_id) for r in history.epochs if r.abandoned] == [
        (e, scratch) for e in range(1, 4)
    ]
    resumed = make_checkpointer(epochs=8)
    resumed.resume(read_info(layout.epoch_dir(6)))
    train(resumed, (7, 8))
    history = read_history(layout.ckpts, last=8)
    assert [r.run_id for r in history.live] == [first] * 6 + [resumed.run_id] * 2
    assert {r.run_id for r in history.epochs if r.abandoned} == {scratch}


def test_a_rollback_to_an_abandoned_epoch_of_the_same_lineage_follows_it_back(
    make_checkpointer, ckpt_dir
):
    layout = CheckpointLayout(ckpt_dir)
    first = train(make_checkpointer(epochs=6), range(1, 7))
    point_link(layout, "last", 4)
    again = make_checkpointer(epochs=6, ckpt_save_interval=10, ckpt_save_best=False)
    again.resume(read_info(layout.epoch_dir(4)))
    second = train(again, [5])  # killed after epoch 5, before any save: last is 4
    point_link(layout, "last", 6)  # epochs/006 is still the first run's
    history = read_history(layout.ckpts, last=6)
    assert [(r.epoch, r.run_id) for r in history.live] == [(e, first) for e in range(1, 7)]
    assert [(r.epoch, r.run_id) for r in history.epochs if r.abandoned] == [(5, second)]
    # without a ckpt-info.json naming its run (older formats), the lines' timeline stands
    os.unlink(os.path.join(layout.epoch_dir(6), "ckpt-info.json"))
    history = read_history(layout.ckpts, last=6)
    assert [r.run_id for r in history.live] == [first] * 4 + [second]


def test_a_resumed_epoch_whose_saved_line_a_crash_lost_still_leads_back(
    make_checkpointer, ckpt_dir
):
    layout = CheckpointLayout(ckpt_dir)
    first = train(make_checkpointer(epochs=6), range(1, 7))
    path = os.path.join(layout.ckpts, "history.jsonl")
    with open(path) as stream:  # killed after last -> 006, before its `saved` line
        lines = [line for line in stream if '"saved"' not in line or '"epoch":6,' not in line]
    with open(path, "w") as stream:
        stream.writelines(lines)
    resumed = make_checkpointer(epochs=8)
    resumed.resume(read_info(layout.epoch_dir(6)))
    train(resumed, (7, 8))
    history = read_history(layout.ckpts, last=8)
    assert [r.run_id for r in history.live] == [first] * 6 + [resumed.run_id] * 2
    assert not any(r.abandoned for r in history.epochs)


def test_a_torn_last_line_is_ignored_and_the_next_writer_ends_it(tmp_path):
    ckpts = str(tmp_path)
    writer = HistoryWriter(ckpts, RUN)
    writer.record_epoch(1, {"loss": 1.0}, 2.0)
    with open(os.path.join(ckpts, "history.jsonl"), "ab") as stream:
        stream.write(b'{"kind":"epoch","run_id":"aaaa')  # killed mid-line
    history = read_history(ckpts)
    assert [r.epoch for r in history.epochs] == [1] and history.warnings == []
    writer = HistoryWriter(ckpts, {**RUN, "run_id": "b" * 32})
    writer.record_epoch(2, {"loss": 0.5}, 2.0)
    history = read_history(ckpts)
    assert [(r.epoch, r.run_id[0]) for r in history.epochs] == [(1, "a"), (2, "b")]
    assert len(history.warnings) == 1 and "line 3" in history.warnings[0]


@pytest.mark.parametrize(
    "damage",
    [b"\x00\xff garbage\n", b"[1, 2]\n", b'{"kind": 5}\n', b'{"kind":"epoch","epoch":"x"}\n'],
)
def test_a_damaged_line_is_skipped_with_a_warning(tmp_path, damage):
    ckpts = str(tmp_path)
    writer = HistoryWriter(ckpts, RUN)
    writer.record_epoch(1, {"loss": 1.0}, 1.0)
    with open(os.path.join(ckpts, "history.jsonl"), "ab") as stream:
        stream.write(damage)
    writer.record_epoch(2, {"loss": 0.5}, 1.0)
    history = read_history(ckpts)
    assert [r.epoch for r in history.live] == [1, 2]
    assert len(history.warnings) == 1 and "history.jsonl" in history.warnings[0]


def test_a_missing_history_is_empty(tmp_path):
    history = read_history(str(tmp_path))
    assert history.epochs == [] and history.warnings == []


def test_a_kill_mid_write_leaves_a_readable_history(tmp_path):
    """SIGKILL while a process appends as fast as it can: at most the last line torn."""
    code = (
        f"import sys; sys.path.insert(0, {os.getcwd()!r})\n"
        "from candle_ckpt.core.format.history import HistoryWriter\n"
        f"w = HistoryWriter({str(tmp_path)!r}, {RUN!r})\n"
        "epoch = 0\n"
        "while True:\n"
        "    epoch += 1\n"
        "    w.record_epoch(epoch, {'loss': 1.0 / epoch, 'pad': 1e300}, 0.1)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    path = os.path.join(str(tmp_path), "history.jsonl")
    while not os.path.exists(path) or os.path.getsize(path) < 200000:
        assert process.poll() is None
    process.kill()
    process.wait()
    history = read_history(str(tmp_path))
    epochs = [r.epoch for r in history.live]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) > 1000
    assert history.warnings == []


def test_the_session_records_train_seconds(ckpt_dir):
    class Adapter:
        adapter_name, model_format = "test", "bytes/1"

        def library_versions(self):
            return {}

        def writer_decision(self, explicit):
            from candle_ckpt.core.run.writer import WriterDecision

            return WriterDecision(True, "test")

        def snapshot(self, copy, into=None):
            return b"state"

        def write_model_file(self, snapshot, directory, checksum):
            return file_writer(snapshot)(directory)

        def trains_in_lockstep(self):
            return False

    session = TrainingSession(
        {"epochs": 2, "ckpt_directory": ckpt_dir, "ckpt_save_best_metric": "loss"}, logger=None
    )
    session.begin(Adapter())
    for epoch in range(2):
        session.epoch_begin(epoch)
        session.epoch_end(epoch + 1, {"loss": 1.0 / (epoch + 1)})
    session.end()
    layout = CheckpointLayout(ckpt_dir)
    records = read_history(layout.ckpts).live
    assert all(r.train_seconds is not None and r.train_seconds >= 0 for r in records)
    info = read_info(layout.epoch_dir(2))
    assert info["train_seconds"] >= 0 and info["save_seconds"] >= info["write_seconds"]
    assert info["adapter"] == "test" and info["metrics"] == {"loss": 0.5}
