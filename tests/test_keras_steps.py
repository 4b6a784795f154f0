"""Keras fit resumed mid-epoch: a run killed (kill -9) or signalled after a step save,
rerun with the same command, ends bit for bit as a run never interrupted (weights,
optimizer, every epoch's logs) and trains none of the saved batches again; on NumPy
arrays, a PyDataset and a tf.data.Dataset, shuffled or not. Real subprocesses
(tests/keras_steps_job.py, 10 batches per epoch, 3 epochs)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("keras")

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_steps_job.py")
BATCHES, EPOCHS = 10, 3


def run(tmp_path, name, *args, expect=0, env=None):
    """Run the job as run `name` in tmp_path (tree tmp_path/save); return its JSON, or
    None for a run that did not end normally."""
    result = subprocess.run(
        [
            sys.executable,
            JOB,
            "--ckpt_directory",
            str(tmp_path / "save"),
            *job_args(tmp_path, name, args),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )
    assert result.returncode == expect, result.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text()) if expect == 0 else None


def job_args(tmp_path, name, args):
    return ["--epochs", str(EPOCHS), "--out", str(tmp_path / f"{name}.json"), *args]


def epoch_logs(tmp_path, *names):
    """{epoch: its logs} of these runs in order: a later run's replace an earlier's
    (a run resumed at an epoch's last batch logs that epoch again)."""
    rows = {}
    for name in names:
        path = tmp_path / f"{name}.epochs.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                rows[row["epoch"]] = row
    return rows


def final_state(tmp_path, name):
    with np.load(tmp_path / f"{name}.npz") as loaded:
        return {key: loaded[key] for key in loaded.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(data_args): the directory of a run never interrupted on that data
    (one per module and data: the checkpoint flags do not change the training)."""
    made = {}

    def made_for(data_args):
        key = tuple(data_args)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("reference")
            run(made[key], "run", *data_args)
        return made[key]

    return made_for


def assert_resumed_exactly(tmp_path, reference_dir, args, resumed_at=None):
    """The run never interrupted in `reference_dir` and the one interrupted in
    `tmp_path` ("first") then rerun with `args` ("resumed") agree bit for bit; the
    resumed run trained only the batches after `resumed_at` (epochs completed, batch;
    None: the step checkpoint `last_step` names)."""
    if resumed_at is None:
        name = os.readlink(tmp_path / "save" / "ckpts" / "last_step")
        resumed_at = tuple(int(part) for part in name.removeprefix("steps/").split("."))
    resumed = run(tmp_path, "resumed", *args)
    assert (resumed["J"]["epoch"], resumed["J"]["batch"]) == resumed_at
    epoch, batch = resumed_at
    assert resumed["trained"] == EPOCHS * BATCHES - epoch * BATCHES - batch
    assert epoch_logs(tmp_path, "first", "resumed") == epoch_logs(reference_dir, "run")
    expected, found = final_state(reference_dir, "run"), final_state(tmp_path, "resumed")
    assert sorted(found) == sorted(expected)
    assert any(key.startswith("optimizer/") for key in found)
    for key in expected:
        assert np.array_equal(found[key], expected[key]), f"{key} differs"


@pytest.mark.slow
@pytest.mark.parametrize(
    "data_args",
    [
        ["--data", "arrays", "--shuffle"],
        ["--data", "pydataset", "--shuffle"],
        ["--data", "tfdata", "--shuffle"],
        ["--compile_after_restart"],
    ],
    ids=["arrays", "pydataset", "tfdata", "arrays, compiled after restart (NT3's order)"],
)
def test_killed_after_a_step_save_resumes_at_its_batch_bit_identical(
    tmp_path, reference, data_args
):
    args = [*data_args, "--ckpt_save_steps", "3"]
    run(tmp_path, "first", *args, "--kill_at", "2:5", expect=-signal.SIGKILL)
    assert_resumed_exactly(tmp_path, reference(data_args), args, resumed_at=(1, 3))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "resumed_at"),
    [("after_write:6", (1, 3)), ("after_step_link:5", (1, 6))],
    ids=["model file of a step half saved", "new step linked, old one not yet removed"],
)
def test_killed_during_a_step_save_resumes_from_the_newest_complete_one(
    tmp_path, reference, fault, resumed_at
):
    """Saves every 3 batches: batches 3, 6, 9 of epoch 1, its end, then 3 and 6 of
    epoch 2; the kill -9 hits the save of batch 6 of epoch 2 (CANDLE_CKPT_FAULT)."""
    args = ["--ckpt_save_steps", "3"]
    run(tmp_path, "first", *args, expect=-signal.SIGKILL, env={"CANDLE_CKPT_FAULT": fault})
    assert_resumed_exactly(tmp_path, reference([]), args, resumed_at=resumed_at)


@pytest.mark.slow
def test_a_step_saved_at_an_epochs_last_batch_resumes_with_none_of_it_to_train(tmp_path, reference):
    """Epoch 1's end is not saved (interval 2, no best), its batch 10 is: the rerun
    starts fit at epoch 1, trains none of it, and still logs it as the first run did."""
    args = ["--ckpt_save_steps", "5", "--ckpt_save_interval", "2", "--ckpt_save_best", "false"]
    run(tmp_path, "first", *args, "--kill_at", "2:1", expect=-signal.SIGKILL)
    assert_resumed_exactly(tmp_path, reference([]), args, resumed_at=(0, 10))


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_async", ["false", "true"])
def test_signalled_mid_epoch_saves_that_batch_and_resumes_there_bit_identical(
    tmp_path, reference, ckpt_async
):
    """fit(x, y, shuffle=False). The job waits for the signal in a callback after batch
    4 of epoch 2, after candle_ckpt's own: candle_ckpt sees it at the end of batch 5,
    and saves that batch."""
    args = ["--ckpt_signal", "USR1", "--ckpt_save_steps", "1000", "--ckpt_async", ckpt_async]
    job = subprocess.Popen(
        [sys.executable, JOB, "--ckpt_directory", str(tmp_path / "save")]
        + job_args(tmp_path, "first", [*args, "--pause_at", "2:4"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = job.stdout.readline()
        assert line.startswith("PAUSED"), job.stderr.read()[-3000:]
        os.kill(job.pid, signal.SIGUSR1)
        assert job.wait(timeout=120) == 75, job.stderr.read()[-3000:]
    finally:
        job.kill()
    assert_resumed_exactly(tmp_path, reference([]), args, resumed_at=(1, 5))


@pytest.mark.slow
def test_stopped_at_the_wall_time_margin_mid_epoch_resumes_there_bit_identical(tmp_path, reference):
    """10 virtual seconds per batch: a job ending 260 s after it starts, with a 20 s
    margin, stops inside epoch 3 (of 10 batches each) after a step save."""
    args = ["--ckpt_save_steps", "1000", "--ckpt_walltime_margin", "20"]
    args += ["--ckpt_end_time", "+260", "--virtual_clock", "10"]
    run(tmp_path, "first", *args, expect=75)
    name = os.readlink(tmp_path / "save" / "ckpts" / "last_step")
    assert name.startswith("steps/002."), name
    assert "WALL-CLOCK STOP after epoch 3, batch" in (tmp_path / "save" / "ckpt.log").read_text()
    assert_resumed_exactly(tmp_path, reference([]), args)


@pytest.mark.parametrize("damage", ["other batch", "no group"])
def test_a_step_checkpoint_whose_model_file_disagrees_with_its_record_is_refused(tmp_path, damage):
    """All or nothing: the step state in model.h5 is checked against its record
    (ckpt-info.json's epoch and batch) before anything is loaded."""
    from keras_steps_job import FEATURES, build_model

    import candle_ckpt
    from candle_ckpt.core.logs import silent_logger
    from candle_ckpt.core.restore.resume import Checkpoint
    from candle_ckpt.keras import steps
    from candle_ckpt.keras.adapter import KerasAdapter

    _, keras = candle_ckpt.import_tensorflow_quietly()
    keras.utils.set_random_seed(0)  # other tests in this process may enable op determinism
    x = np.ones((32, FEATURES), "float32")
    trained = build_model(keras)
    trained.fit(x, x[:, :1], batch_size=16, verbose=0)  # metrics and optimizer built
    writer = KerasAdapter(trained, batches_per_epoch=2)
    writer.set_position(1, 0 if damage == "no group" else 1)
    writer.write_model_file(writer.snapshot(copy=False), str(tmp_path), checksum=False)
    record = {"model_file": "model.h5", "batch": 2 if damage == "other batch" else 1}
    checkpoint = Checkpoint(
        1, str(tmp_path), record, memoryview((tmp_path / "model.h5").read_bytes())
    )

    model = build_model(keras)
    before = [v.numpy() for v in model.weights]
    with pytest.raises(candle_ckpt.CheckpointFormatError) as refused:
        KerasAdapter(model).restore(checkpoint, silent_logger())
    expected = {
        "other batch": "group 'candle_ckpt_steps' is at (epochs completed, batch) (1, 1), "
        "its ckpt-info.json at (1, 2)",
        "no group": "has no 'candle_ckpt_steps' group, but its ckpt-info.json records batch 1",
    }[damage]
    assert expected in str(refused.value)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.weights))
    assert steps.take(model) is None


def test_step_saves_of_a_model_training_several_batches_per_call_are_refused(tmp_path):
    """fit reports only every k-th batch with steps_per_execution=k: refused before
    anything is trained or saved."""
    import candle_ckpt

    _, keras = candle_ckpt.import_tensorflow_quietly()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("adam", "mse", steps_per_execution=2)
    params = {"ckpt_directory": str(tmp_path), "epochs": 1, "ckpt_save_steps": 2}
    callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
    x = np.ones((32, 4), "float32")
    with pytest.raises(candle_ckpt.ParameterValueError) as refused:
        model.fit(x, x[:, :1], batch_size=8, verbose=0, callbacks=[callback])
    assert "compiled with steps_per_execution=2; step checkpoints need" in str(refused.value)
    assert int(model.optimizer.iterations.numpy()) == 0
    assert not (tmp_path / "ckpts").exists()
