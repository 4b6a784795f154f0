"""Real PyTorch training processes (tests/torch_job.py): killed, pre-empted, corrupted,
rolled back, resumed, upstream and hostile trees. Every resume must end with the very
weights (SHA-256 digest) of an uninterrupted run."""

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import zlib

import pytest

torch = pytest.importorskip("torch")

import candle_ckpt  # noqa: E402
from candle_ckpt.core.errors import (  # noqa: E402
    CheckpointError,
    CheckpointFormatError,
    ChecksumMismatchError,
    WriterLockedError,
)
from candle_ckpt.core.format.info import CHECKSUM_DISABLED  # noqa: E402
from candle_ckpt.core.format.layout import CheckpointLayout  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
JOB = os.path.join(HERE, "torch_job.py")
ENV = dict(os.environ, PYTHONPATH=TOP, OMP_NUM_THREADS="1")
ENV.pop("CANDLE_CKPT_FAULT", None)
EPOCHS = 4

sys.path.insert(0, HERE)
from test_pytorch_state import Payload  # noqa: E402


def job(root, *args, epochs=EPOCHS, env=None, expect=0):
    result = subprocess.run(
        [sys.executable, JOB, "--ckpt_directory", str(root), "--epochs", str(epochs), *args],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=300,
    )
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def digest(result):
    return re.search(r"final digest (\w+)", result.stdout).group(1)


def epoch_lines(result):
    return re.findall(r"^epoch \d+: .*$", result.stdout, re.M)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: an uninterrupted run's output, its tree copied for each test."""
    root = tmp_path_factory.mktemp("reference") / "save"
    return job(root), root


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "candle_ckpt", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


@pytest.mark.parametrize("flags", [[], ["--ckpt_async", "true"]])
def test_killed_mid_epoch_resumes_bit_identically(tmp_path, uninterrupted, flags):
    reference = uninterrupted[0]
    root = tmp_path / "save"
    job(root, "--kill_at", "3:5", *flags, expect=-signal.SIGKILL)
    # with ckpt_async the save of epoch 2 may still have been in flight
    last = int(os.readlink(root / "ckpts" / "last")[-3:])
    assert last == 2 or (flags and last == 1)
    resumed = job(root, *flags)
    assert f"restarted from epoch {last}" in resumed.stderr
    assert epoch_lines(resumed) == epoch_lines(reference)[last:]
    assert digest(resumed) == digest(reference)
    assert os.readlink(root / "ckpts" / "last") == "epochs/004"


def test_preempted_by_signal_exits_75_then_resumes_exactly(tmp_path, uninterrupted):
    root = tmp_path / "save"
    process = subprocess.Popen(
        [
            sys.executable,
            JOB,
            "--ckpt_directory",
            str(root),
            "--epochs",
            str(EPOCHS),
            "--ckpt_signal",
            "USR1",
            "--ckpt_save_interval",
            "3",
            "--pause_at",
            "3:2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    for line in process.stdout:
        if line.startswith("PAUSED"):
            os.kill(process.pid, signal.SIGUSR1)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    # epoch 2 was not due (interval 3): the copy taken at its end is saved on the signal
    assert os.readlink(root / "ckpts" / "last") == "epochs/002"
    resumed = job(root, "--ckpt_save_interval", "3")
    assert digest(resumed) == digest(uninterrupted[0])


def test_corruption_is_refused_and_fallback_resumes_exactly(tmp_path, uninterrupted):
    root = tmp_path / "save"
    shutil.copytree(uninterrupted[1], root, symlinks=True)
    model_file = root / "ckpts" / "epochs" / "004" / "model.h5"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    failed = job(root, expect=1)
    assert "ChecksumMismatchError" in failed.stderr and "epochs/004/model.h5" in failed.stderr
    resumed = job(root, "--ckpt_restart_fallback", "true")
    assert "FALLING BACK to epoch 3" in resumed.stderr
    assert digest(resumed) == digest(uninterrupted[0])


def test_operator_commands_and_rollback_on_a_pytorch_tree(tmp_path, uninterrupted):
    root = tmp_path / "save"
    shutil.copytree(uninterrupted[1], root, symlinks=True)
    listing = cli("list", root)
    assert re.findall(r"^ +(\d+) ", listing, re.M) == [str(e) for e in range(1, EPOCHS + 1)]
    assert '"adapter": "pytorch"' in cli("info", root)
    assert '"model_format": "torch-h5/2"' in cli("info", root)
    assert cli("verify", root, "--all").count(": ok (") == EPOCHS
    assert "epochs/002" in cli("rollback", root, "2")
    assert os.readlink(root / "ckpts" / "last") == "epochs/002"
    resumed = job(root)
    assert "restarted from epoch 2" in resumed.stderr
    assert digest(resumed) == digest(uninterrupted[0])
    cli("prune", root, "--keep", "1")
    left = CheckpointLayout(str(root)).list_epochs()
    assert EPOCHS in left and len(left) <= 2  # last, and best if it is another


def test_keep_policy(tmp_path):
    root = tmp_path / "save"
    job(root, "--ckpt_keep_limit", "2")
    layout = CheckpointLayout(str(root))
    kept = set(layout.list_epochs())
    assert {3, 4} <= kept <= {3, 4, layout.resolve_link("best")}


def test_a_second_writer_is_refused_while_the_first_trains(tmp_path):
    root = tmp_path / "save"
    process = subprocess.Popen(
        [
            sys.executable,
            JOB,
            "--ckpt_directory",
            str(root),
            "--epochs",
            str(EPOCHS),
            "--pause_at",
            "2:1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        for line in process.stdout:
            if line.startswith("PAUSED"):
                break
        ckpt = candle_ckpt.CandleCkptPyTorch(
            {"ckpt_directory": str(root), "epochs": 4}, verbose=False
        )
        model = torch.nn.Linear(16, 1)
        ckpt.set_model({"model": model})
        with pytest.raises(WriterLockedError, match=f"pid {process.pid}"):
            ckpt.ckpt_epoch(0, 1.0)
    finally:
        process.kill()
        process.wait()


def upstream_tree(root, model_file_bytes, epoch=2):
    """What upstream CANDLE's CandleCkptPyTorch leaves: a torch pickle named model.h5,
    the 8-key JSON, absolute links."""
    directory = root / "ckpts" / "epochs" / f"{epoch:03d}"
    directory.mkdir(parents=True)
    (directory / "model.h5").write_bytes(model_file_bytes)
    (directory / "ckpt-info.json").write_text(
        '{"epoch": %d, "save_best_metric": "val_loss", "best_metric_last": Infinity, '
        '"model_file": "model.h5", "checksum": "%d", "timestamp": "2022-01-01 10:00:00", '
        '"time_elapsed": 3.5, "metadata": null}\n' % (epoch, zlib.crc32(model_file_bytes))
    )
    for name in ("last", "best"):
        os.symlink(str(directory), root / "ckpts" / name)


def test_upstream_candle_tree_restores_weights_and_optimizer_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(
        {
            "epoch": 2,
            "model_state_dict": net.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "loss": 0,
        },
        buffer,
    )
    root = tmp_path / "save"
    upstream_tree(root, buffer.getvalue())
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    ckpt = candle_ckpt.CandleCkptPyTorch({"ckpt_directory": str(root), "epochs": 3}, verbose=False)
    ckpt.set_model({"net": fresh, "optimizer": fresh_opt})
    with caplog.at_level(logging.INFO, logger="candle_ckpt"):
        J = ckpt.restart(fresh)
    assert J["epoch"] == 2 and "upstream CANDLE torch pickle" in caplog.text
    assert "no RNG state (upstream CANDLE saves none) restored" in caplog.text
    assert torch.equal(fresh.weight, net.weight)
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    ckpt.ckpt_epoch(2, 0.5)  # training goes on, in candle_ckpt's format
    assert os.readlink(root / "ckpts" / "last") == "epochs/003"
    assert (
        candle_ckpt.CandleCkptPyTorch(
            {"ckpt_directory": str(root), "epochs": 3}, verbose=False
        ).restart({"model": torch.nn.Linear(3, 2), "optimizer": fresh_opt})["epoch"]
        == 3
    )


def test_hostile_pickle_in_a_tree_is_refused_and_never_runs(tmp_path):
    marker = str(tmp_path / "payload-ran")
    buffer = io.BytesIO()
    torch.save({"model_state_dict": Payload(marker)}, buffer)
    root = tmp_path / "save"
    upstream_tree(root, buffer.getvalue())
    ckpt = candle_ckpt.CandleCkptPyTorch({"ckpt_directory": str(root), "epochs": 3}, verbose=False)
    net = torch.nn.Linear(3, 2)
    ckpt.set_model({"model": net})
    before = net.weight.detach().clone()
    with pytest.raises(CheckpointFormatError, match="could run code from the file"):
        ckpt.restart(net)
    assert not os.path.exists(marker) and torch.equal(before, net.weight)


def test_restart_required_without_a_checkpoint_fails(tmp_path):
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {"ckpt_directory": str(tmp_path / "none"), "epochs": 3, "ckpt_restart_mode": "required"},
        verbose=False,
    )
    ckpt.set_model({"model": torch.nn.Linear(1, 1)})
    with pytest.raises(CheckpointError, match="required"):
        ckpt.restart()


def test_corrupt_last_is_refused_in_process_with_nothing_loaded(tmp_path, uninterrupted):
    root = tmp_path / "save"
    shutil.copytree(uninterrupted[1], root, symlinks=True)
    path = root / "ckpts" / "epochs" / "004" / "model.h5"
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    ckpt = candle_ckpt.CandleCkptPyTorch({"ckpt_directory": str(root), "epochs": 4}, verbose=False)
    net = torch.nn.Linear(1, 1)
    ckpt.set_model({"model": net})
    with pytest.raises(ChecksumMismatchError):
        ckpt.restart()


def test_saved_without_checksums_records_none_and_restarts_with_a_warning(tmp_path, caplog):
    params = {"ckpt_directory": str(tmp_path / "save"), "epochs": 2}
    torch.manual_seed(0)
    net = torch.nn.Linear(64, 64)
    ckpt = candle_ckpt.CandleCkptPyTorch({**params, "ckpt_checksum": False}, verbose=False)
    ckpt.set_model({"model": net})
    assert ckpt.restart() is None
    for epoch in range(2):
        with torch.no_grad():
            net.weight.add_(1.0)
        ckpt.ckpt_epoch(epoch, 1.0)
    info = json.loads((tmp_path / "save" / "ckpts" / "last" / "ckpt-info.json").read_text())
    assert info["checksum"] == CHECKSUM_DISABLED
    assert all(entry["crc32"] is None for entry in info["files"].values())

    fresh = torch.nn.Linear(64, 64)
    resumed = candle_ckpt.CandleCkptPyTorch({**params, "ckpt_checksum": True}, verbose=False)
    resumed.set_model({"model": fresh})
    with caplog.at_level(logging.WARNING, logger="candle_ckpt"):
        assert resumed.restart()["epoch"] == 2
    assert "written without checksums" in caplog.text
    assert torch.equal(fresh.weight, net.weight) and torch.equal(fresh.bias, net.bias)
