"""Two MultiWorkerMirroredStrategy workers on localhost share one checkpoint tree: only
the chief writes it; both are killed mid-training, both restart from the same epoch,
and both finish with identical weights, bit for bit those of an uninterrupted
two-worker run. Runtime about a minute on 2 cores (four pairs of TensorFlow starts)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from keras_helpers import datasets

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.slow

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiworker_job.py")
TIMEOUT = 240  # seconds for one run of both workers; a hung collective fails the test


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_workers(ckpt_dir, out_dir, *args, only_worker_1=()):
    """Run both workers to completion (or death); return [(returncode, stderr)].

    `ckpt_dir` is the tree of both, or a list of one tree per worker; `only_worker_1`
    are more arguments for worker 1."""
    ckpt_dirs = ckpt_dir if isinstance(ckpt_dir, list) else [ckpt_dir] * 2
    ports = ",".join(map(str, free_ports(2)))
    extra = [(), tuple(only_worker_1)]
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                JOB,
                "--ckpt_directory",
                str(ckpt_dirs[i]),
                "--workers",
                ports,
                "--index",
                str(i),
                "--out",
                str(out_dir / f"worker{i}.npz"),
                *args,
                *extra[i],
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for job in jobs:
            _, stderr = job.communicate(timeout=TIMEOUT)
            results.append((job.returncode, stderr))
    finally:
        for job in jobs:
            job.kill()
    return results


def arrays(path):
    with np.load(path) as loaded:
        return {name: loaded[name] for name in loaded.files}


def test_two_workers_killed_in_epoch_2_restart_from_the_same_epoch_and_agree(tmp_path):
    ckpt_dir = tmp_path / "save"
    killed = run_workers(ckpt_dir, tmp_path, "--epochs", "3", "--kill_at", "2:2")
    assert [code for code, _ in killed] != [0, 0], "the kill point was not reached"
    assert os.readlink(ckpt_dir / "ckpts" / "last") == "epochs/001"
    assert "not the checkpoint writer" in killed[1][1]

    finished = run_workers(ckpt_dir, tmp_path, "--epochs", "3")
    for index, (code, stderr) in enumerate(finished):
        assert code == 0, f"worker {index}: {stderr[-3000:]}"
        assert "restarted from epoch 1" in stderr
    assert "not the checkpoint writer" in finished[1][1]

    # one tree, written by the chief alone: each epoch saved once, one log
    assert sorted(os.listdir(ckpt_dir)) == ["ckpt.log", "ckpts"]
    assert sorted(os.listdir(ckpt_dir / "ckpts" / "epochs")) == ["001", "002", "003"]
    log = open(ckpt_dir / "ckpt.log").read()
    for epoch in (1, 2, 3):
        assert log.count(f"epoch {epoch} saved") == 1, log
    assert log.count("restarted from epoch 1") == 1, "only the chief logs to ckpt.log"

    # both workers end with the same state, and it is what the chief saved
    chief, other = arrays(tmp_path / "worker0.npz"), arrays(tmp_path / "worker1.npz")
    assert sorted(chief) == sorted(other)
    for name in chief:
        assert np.array_equal(chief[name], other[name]), name
    saved = datasets(ckpt_dir / "ckpts" / "epochs" / "003" / "model.h5")
    for group in ("model_weights", "optimizer_weights"):
        assert sorted(v.tobytes() for k, v in saved.items() if k.startswith(group + "/")) == sorted(
            v.tobytes() for k, v in chief.items() if k.startswith(group)
        )

    # resuming is exact: two workers never interrupted end bit for bit the same
    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    assert [
        code for code, _ in run_workers(uninterrupted / "save", uninterrupted, "--epochs", "3")
    ] == [0, 0]
    never_killed = arrays(uninterrupted / "worker0.npz")
    for name in chief:
        assert np.array_equal(chief[name], never_killed[name]), name

    # a single process trains the same problem to nearly the same weights, not bit for
    # bit: each worker averages the gradient of its half batch, then the halves are
    # summed (observed: at most 6e-8 apart, relative 2.4e-7, after 3 epochs)
    single = tmp_path / "single"
    single.mkdir()
    reference = subprocess.run(
        [
            sys.executable,
            JOB,
            "--ckpt_directory",
            str(single / "save"),
            "--epochs",
            "3",
            "--out",
            str(single / "weights.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    alone = arrays(single / "weights.npz")
    for name in chief:
        np.testing.assert_allclose(chief[name], alone[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_workers_killed_mid_epoch_resume_at_the_saved_batch_bit_identical(tmp_path):
    """A step checkpoint every batch; killed after batch 3 of epoch 2 (of 4), both
    workers restart at that batch, train only the 5 batches left, and end bit for bit
    as two workers never interrupted."""
    ckpt_dir = tmp_path / "save"
    steps = ("--epochs", "3", "--ckpt_save_steps", "1")
    killed = run_workers(ckpt_dir, tmp_path, *steps, "--kill_at", "2:3")
    assert [code for code, _ in killed] != [0, 0], "the kill point was not reached"
    assert os.readlink(ckpt_dir / "ckpts" / "last_step") == "steps/001.000003"

    finished = run_workers(ckpt_dir, tmp_path, *steps)
    for index, (code, stderr) in enumerate(finished):
        assert code == 0, f"worker {index}: {stderr[-3000:]}"
        assert "trained 5 batches" in stderr, stderr[-3000:]

    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    assert [code for code, _ in run_workers(uninterrupted / "save", uninterrupted, *steps)] == [
        0,
        0,
    ]
    never_killed = arrays(uninterrupted / "worker0.npz")
    for worker in ("worker0", "worker1"):
        resumed = arrays(tmp_path / f"{worker}.npz")
        assert sorted(resumed) == sorted(never_killed)
        for name in resumed:
            assert np.array_equal(resumed[name], never_killed[name]), f"{worker} {name}"


def one_epoch_tree(tmp_path, name):
    """A tree with epoch 1, written by a single process."""
    tree = tmp_path / name / "save"
    made = subprocess.run(
        [
            sys.executable,
            JOB,
            "--ckpt_directory",
            str(tree),
            "--epochs",
            "1",
            "--out",
            str(tmp_path / f"{name}.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    return tree


def test_workers_that_see_different_trees_all_fail_before_training(tmp_path):
    seen_by_chief = one_epoch_tree(tmp_path, "chief")
    results = run_workers(
        [seen_by_chief, tmp_path / "node-local" / "save"], tmp_path, "--epochs", "3"
    )
    for code, stderr in results:
        assert code != 0
        assert "the workers do not agree on the checkpoint to restart from" in stderr
    assert sorted(os.listdir(seen_by_chief / "ckpts" / "epochs")) == ["001"]


def test_a_load_failing_on_one_worker_after_the_agreement_stops_every_worker(tmp_path):
    # No hang: TensorFlow's coordination service aborts the chief's next collective
    # (loading builds and assigns mirrored variables) once worker 1 has exited.
    tree = one_epoch_tree(tmp_path, "shared")
    (chief_code, chief_err), (code, stderr) = run_workers(
        tree, tmp_path, "--epochs", "3", only_worker_1=["--fail_restore"]
    )
    assert code != 0 and "injected load failure" in stderr
    assert chief_code != 0, chief_err[-3000:]
    assert sorted(os.listdir(tree / "ckpts" / "epochs")) == ["001"]
