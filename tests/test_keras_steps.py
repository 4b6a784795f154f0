"""Keras fit resumed mid-epoch: a run killed (kill -9) or signalled after a step save,
rerun with the same command, ends bit for bit as a run never interrupted (weights,
optimizer, every epoch's logs) and trains none of the saved batches again; on NumPy
arrays and a PyDataset, with fit's shuffle on and off. Real subprocesses
(tests/keras_steps_job.py, 10 batches per epoch, 3 epochs)."""

import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

pytest.importorskip("keras")

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_steps_job.py")
BATCHES, EPOCHS = 10, 3


def run(tmp_path, name, *args, expect=0):
    """Run the job as run `name` in tmp_path (tree tmp_path/save); return its JSON, or
    None for a run that did not end normally."""
    result = subprocess.run(
        [sys.executable, JOB, "--ckpt_directory", str(tmp_path / "save"), *job_args(tmp_path, name, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == expect, result.stderr[-3000:]
    return json.loads((tmp_path / f"{name}.json").read_text()) if expect == 0 else None


def job_args(tmp_path, name, args):
    return ["--epochs", str(EPOCHS), "--out", str(tmp_path / f"{name}.json"), *args]


def epoch_logs(tmp_path, *names):
    rows = []
    for name in names:
        path = tmp_path / f"{name}.epochs.jsonl"
        if path.exists():
            rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def final_state(tmp_path, name):
    with np.load(tmp_path / f"{name}.npz") as loaded:
        return {key: loaded[key] for key in loaded.files}


def assert_resumed_exactly(tmp_path, data_args, resumed_at):
    """The reference run (never interrupted) and the interrupted one then `resumed`
    agree bit for bit; the resumed run trained only the batches after `resumed_at`
    (epochs completed, batch)."""
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    run(reference_dir, "run", *data_args)
    resumed = run(tmp_path, "resumed", *data_args)
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
@pytest.mark.parametrize("data", ["arrays", "pydataset"])
def test_killed_after_a_step_save_resumes_at_its_batch_bit_identical(tmp_path, data):
    args = ["--data", data, "--shuffle", "--ckpt_save_steps", "3"]
    run(tmp_path, "first", *args, "--kill_at", "2:5", expect=-signal.SIGKILL)
    assert_resumed_exactly(tmp_path, args, resumed_at=(1, 3))


@pytest.mark.slow
def test_signalled_mid_epoch_saves_that_batch_and_resumes_there_bit_identical(tmp_path):
    args = ["--ckpt_signal", "USR1"]
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
    assert_resumed_exactly(tmp_path, args, resumed_at=(1, 4))

