"""Restart into PyTorch lazy modules (`torch.nn.LazyLinear`), whose parameters have no
shape until the first batch: the load materialises them in place, so an optimizer made
before holds the very Parameters, and kill -9 resumes bit for bit."""

import re
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from test_pytorch_restart import ENV, JOB  # noqa: E402

import candle_ckpt  # noqa: E402
from candle_ckpt.core.errors import CheckpointFormatError  # noqa: E402
from candle_ckpt.pytorch import state  # noqa: E402
from candle_ckpt.pytorch.adapter import TorchAdapter  # noqa: E402


def job(root, *args, expect=0):
    result = subprocess.run(
        [sys.executable, JOB, "--ckpt_directory", str(root), "--epochs", "4", "--lazy", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def digest(result):
    return re.search(r"final digest (\w+)", result.stdout).group(1)


@pytest.fixture(scope="module")
def uninterrupted_lazy(tmp_path_factory):
    return job(tmp_path_factory.mktemp("reference_lazy") / "save")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--ckpt_async", "true")], ids=["sync", "async"])
def test_lazy_modules_killed_mid_epoch_resume_bit_identically(tmp_path, uninterrupted_lazy, flags):
    root = tmp_path / "save"
    job(root, *flags, "--kill_at", "3:2", expect=-9)
    resumed = job(root, *flags)
    assert re.search(
        r"restarted from epoch [12]: read and verified .* loaded "
        r".*\(model, optimizer, scheduler, generator, RNG\)",
        resumed.stderr,
    )
    assert digest(resumed) == digest(uninterrupted_lazy)


# -- in process ---------------------------------------------------------------------------


def lazy_net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.LazyLinear(8), torch.nn.ReLU(), torch.nn.LazyLinear(1))


def batches():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    return [(x[k : k + 8], x[k : k + 8, :1] * 2) for k in range(0, 32, 8)]


def train_epoch(net, optimizer):
    for xb, yb in batches():
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(xb), yb).backward()
        optimizer.step()


def run(params, net, optimizer, epochs):
    ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
    ckpt.set_model({"model": net, "optimizer": optimizer})
    J = ckpt.restart(verbose=False)
    for epoch in range(J["epoch"] if J else 0, epochs):
        train_epoch(net, optimizer)
        ckpt.ckpt_epoch(epoch, {"val_loss": 0.0})
    ckpt.finish()
    return J


def test_restart_materialises_lazy_parameters_the_optimizer_already_holds(tmp_path):
    params = {"ckpt_directory": str(tmp_path / "save"), "epochs": 3}
    reference = lazy_net(1)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    run(
        {**params, "ckpt_directory": str(tmp_path / "reference")}, reference, reference_optimizer, 3
    )
    first = lazy_net(1)
    run(params, first, torch.optim.Adam(first.parameters(), lr=0.01), 2)

    resumed = lazy_net(7)
    optimizer = torch.optim.Adam(resumed.parameters(), lr=0.01)
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert not TorchAdapter({"model": resumed}).state_exists()
    J = run({**params, "epochs": 2}, resumed, optimizer, 2)
    assert J["epoch"] == 2
    assert [id(p) for p in resumed.parameters()] == held
    assert not state.uninitialized({"model": resumed})
    assert TorchAdapter({"model": resumed}).state_exists()
    train_epoch(resumed, optimizer)
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [id(p) for p in resumed.parameters()] == held
    for a, b in zip(reference_optimizer.state.values(), optimizer.state.values()):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_lazy_parameter_of_another_dtype_is_refused_before_anything_loads(tmp_path):
    params = {"ckpt_directory": str(tmp_path / "save"), "epochs": 2}
    net = lazy_net(1)
    run(params, net, torch.optim.Adam(net.parameters(), lr=0.01), 1)
    doubles = lazy_net(7).double()
    optimizer = torch.optim.Adam(doubles.parameters(), lr=0.01)
    ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
    ckpt.set_model({"model": doubles, "optimizer": optimizer})
    with pytest.raises(
        CheckpointFormatError,
        match=r"entry 'model', '0.weight': float32 of "
        r"shape \(8, 4\) in the file, the model's uninitialised \(lazy\) "
        r"parameter is float64",
    ):
        ckpt.restart(verbose=False)
    assert state.uninitialized({"model": doubles}) == [
        "model.0.weight",
        "model.0.bias",
        "model.2.weight",
        "model.2.bias",
    ]


def test_saving_a_lazy_module_never_called_is_refused_naming_the_parameter():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LazyLinear(2))
    assert state.state_nbytes({"model": net}, weights_only=True) == state.state_nbytes(
        {"model": net[0]}, weights_only=True
    )
    with pytest.raises(
        CheckpointFormatError,
        match=r"cannot save state\['model'\]\['1.weight'"
        r"\]: an uninitialised parameter of a lazy module",
    ):
        state.snapshot({"model": net}, weights_only=True)
