"""Helpers for the Keras tests: run the job in a subprocess, compare model files."""

import os
import subprocess
import sys

import h5py
import numpy as np

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keras_job.py")


def job_command(ckpt_dir, *args):
    """The command line of tests/keras_job.py with these flags."""
    return [sys.executable, JOB, "--ckpt_directory", str(ckpt_dir), *args]


def run_job(ckpt_dir, *args, expect_killed=False):
    """Run tests/keras_job.py; return the CompletedProcess (killed ones too)."""
    result = subprocess.run(
        job_command(ckpt_dir, *args), capture_output=True, text=True, timeout=300
    )
    if expect_killed:
        assert result.returncode == -9, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def datasets(path):
    """{dataset path: numpy array} of every dataset in an HDF5 file."""
    found = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return found


def seeded_state(path, framework):
    """`datasets` of a model file without what an example job leaves unseeded: a torch
    file's Python and NumPy generator states (in the JSON part, and NumPy's array),
    which fresh processes start differently since the examples draw from neither."""
    import json

    state = datasets(path)
    if framework == "torch":
        encoded = json.loads(state.pop("state").tobytes())
        key = dict(encoded["rng"]["dict"])["numpy"]["tuple"][1]["ndarray"]
        if "tensors" in encoded:  # torch-h5/2: every tensor's bytes in "data"
            _, _, offset, nbytes = encoded["tensors"][key]
            state["data"] = state["data"].copy()
            state["data"][offset : offset + nbytes] = 0
        else:
            del state[f"tensors/{key}"]
    return state


def assert_same_state(path_a, path_b):
    """Every weight, optimizer variable and RNG state is bit-identical."""
    a, b = datasets(path_a), datasets(path_b)
    assert sorted(a) == sorted(b)
    assert any(name.startswith("optimizer_weights/") for name in a)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def tree_summary(ckpt_dir):
    """(epochs on disk, last target, best target) of a checkpoint tree."""
    ckpts = os.path.join(ckpt_dir, "ckpts")
    epochs = sorted(os.listdir(os.path.join(ckpts, "epochs")))
    links = (os.readlink(os.path.join(ckpts, name)) for name in ("last", "best"))
    return (epochs, *links)


def fit_checkpointed(model, params, x, y, epochs, initial_epoch=0, batch_size=16, **fit_kwargs):
    """model.fit over (x, y) in order (no shuffle, silent) with a CandleCheckpointCallback
    of `params`; returns (the fit's History, the callback)."""
    import candle_ckpt

    callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
    history = model.fit(
        x,
        y,
        epochs=epochs,
        initial_epoch=initial_epoch,
        batch_size=batch_size,
        shuffle=False,
        verbose=0,
        callbacks=[callback],
        **fit_kwargs,
    )
    return history, callback
