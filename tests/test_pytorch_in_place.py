"""A restart reads the registered modules' large tensors straight into their own memory
once the file verifies: same values, same memory, and a file that fails leaves nothing
behind or says what it overwrote."""

import json
import os

import h5py
import numpy as np
import pytest
from conftest import change_after_its_crc

torch = pytest.importorskip("torch")

import candle_ckpt  # noqa: E402
from candle_ckpt.core.storage import checksum  # noqa: E402
from candle_ckpt.pytorch import state  # noqa: E402
from candle_ckpt.pytorch.adapter import TorchAdapter  # noqa: E402


@pytest.fixture(autouse=True)
def in_place_from_any_size(monkeypatch):
    """These models are small: read them in place all the same."""
    monkeypatch.setattr(checksum, "IN_PLACE_MIN_BYTES", 0)
    monkeypatch.setattr(state, "IN_PLACE_MIN_BYTES", 0)


class Tied(torch.nn.Module):
    """An embedding and an output layer sharing one weight (128 KiB)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(128, 256)
        self.hidden = torch.nn.Linear(256, 256)
        self.out = torch.nn.Linear(256, 128, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def wide_net(seed=1):
    """A net whose first weight (128 KiB) is read in place, with its AdamW."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    return net, torch.optim.AdamW(net.parameters(), lr=0.01)


def tied_net(seed=1):
    torch.manual_seed(seed)
    net = Tied()
    return net, torch.optim.AdamW(net.parameters(), lr=0.01)


def train_step(net, optimizer, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 256, generator=generator)
    optimizer.zero_grad()
    net(x).square().mean().backward()
    optimizer.step()


def session(params, net, optimizer):
    ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
    ckpt.set_model({"model": net, "optimizer": optimizer})
    return ckpt


def restarted(params, net, optimizer):
    ckpt = session(params, net, optimizer)
    try:
        return ckpt.restart(verbose=False)
    finally:
        ckpt.finish()


def values(net, optimizer):
    tensors = list(net.state_dict().values())
    tensors += [v for s in optimizer.state_dict()["state"].values() for v in s.values()]
    return [t.clone() for t in tensors]


def assert_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def save_epochs(tmp_path, build, epochs=2):
    """A tree of `epochs` epochs of the net `build` makes, and the net after the last."""
    params = {"ckpt_directory": str(tmp_path / "save"), "epochs": epochs, "ckpt_save_best": False}
    net, optimizer = build()
    ckpt = session(params, net, optimizer)
    for epoch in range(epochs):
        train_step(net, optimizer, epoch)
        ckpt.ckpt_epoch(epoch, {"val_loss": 0.0})
    ckpt.finish()
    return params, net, optimizer


def model_file(params, epoch):
    return os.path.join(params["ckpt_directory"], "ckpts", "epochs", f"{epoch:03d}", "model.h5")


def tensor_offset(params, epoch, key):
    """Where the file has the bytes of the module's state-dict entry `key`."""
    with h5py.File(model_file(params, epoch), "r") as f:
        encoded = json.loads(np.asarray(f["state"][()], np.uint8).tobytes())
        module = dict(encoded["objects"]["dict"])["model"]
        index = dict(module["odict"])[key]["tensor"]
        return f[state.DATA].id.get_offset() + encoded["tensors"][index][2]


@pytest.fixture()
def trained(tmp_path):
    return save_epochs(tmp_path, wide_net)


def test_large_tensors_are_read_into_the_modules_own_memory(trained, monkeypatch):
    params, net, optimizer = trained
    fresh, fresh_optimizer = wide_net(seed=7)
    weight = fresh[0].weight
    before = weight.data_ptr()
    planned = []
    real = state.plan_in_place

    def noting(*args):
        planned.append(real(*args))
        return planned[-1]

    monkeypatch.setattr(state, "plan_in_place", noting)
    assert restarted(params, fresh, fresh_optimizer)["epoch"] == 2
    assert [t.key for t in planned[0].targets.values()] == ["0.weight"]
    assert fresh[0].weight is weight and weight.data_ptr() == before
    assert_equal(values(net, optimizer), values(fresh, fresh_optimizer))

    # the same restart without the in-place read: bit-identical, and so is the step after
    monkeypatch.setattr(TorchAdapter, "read_model_into", lambda self: None)
    copied, copied_optimizer = wide_net(seed=8)
    assert restarted(params, copied, copied_optimizer)["epoch"] == 2
    assert_equal(values(copied, copied_optimizer), values(fresh, fresh_optimizer))
    for model, opt in ((net, optimizer), (fresh, fresh_optimizer), (copied, copied_optimizer)):
        train_step(model, opt, 5)
    assert_equal(values(net, optimizer), values(fresh, fresh_optimizer))
    assert_equal(values(net, optimizer), values(copied, copied_optimizer))


def test_a_tied_weight_is_read_once_and_stays_shared(tmp_path):
    params, net, optimizer = save_epochs(tmp_path, tied_net)
    fresh, fresh_optimizer = tied_net(seed=7)
    assert restarted(params, fresh, fresh_optimizer)["epoch"] == 2
    assert fresh.out.weight is fresh.embed.weight
    assert_equal(values(net, optimizer), values(fresh, fresh_optimizer))
    train_step(net, optimizer, 5)
    train_step(fresh, fresh_optimizer, 5)
    assert_equal(values(net, optimizer), values(fresh, fresh_optimizer))


def test_a_flip_in_a_large_tensor_leaves_the_model_untouched(trained):
    params, _, _ = trained
    with open(model_file(params, 2), "r+b") as stream:
        stream.seek(tensor_offset(params, 2, "0.weight") + 100)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0x10]))
    fresh, fresh_optimizer = wide_net(seed=7)
    before = values(fresh, fresh_optimizer)
    with pytest.raises(candle_ckpt.ChecksumMismatchError) as raised:
        restarted(params, fresh, fresh_optimizer)
    assert "overwritten" not in str(raised.value)
    assert_equal(before, values(fresh, fresh_optimizer))


@pytest.fixture()
def changed_after_verification(trained, monkeypatch):
    """The newest model file changes between its CRC32 and the read into the model."""
    params, _, _ = trained
    path, offset = model_file(params, 2), tensor_offset(params, 2, "0.weight")
    change_after_its_crc(monkeypatch, path, offset)
    return params


def test_a_file_that_changes_after_its_crc_is_refused_saying_what_it_overwrote(
    changed_after_verification,
):
    fresh, fresh_optimizer = wide_net(seed=7)
    with pytest.raises(candle_ckpt.ChecksumMismatchError, match="values are now partly unverified"):
        restarted(changed_after_verification, fresh, fresh_optimizer)
    assert torch.isnan(fresh[0].weight[0, :16]).all()  # the 0xff bytes it read


def test_fallback_loads_every_tensor_the_changed_file_overwrote(changed_after_verification):
    params = {**changed_after_verification, "ckpt_restart_fallback": True}
    fresh, fresh_optimizer = wide_net(seed=7)
    assert restarted(params, fresh, fresh_optimizer)["epoch"] == 1
    reference, reference_optimizer = wide_net(seed=8)
    state.restore(
        {"model": reference, "optimizer": reference_optimizer},
        model_file(params, 1),
        checksum.read_file(model_file(params, 1))[0],
        None,
    )
    assert_equal(values(reference, reference_optimizer), values(fresh, fresh_optimizer))


def test_an_upstream_file_that_does_not_load_every_overwritten_module_is_refused(tmp_path):
    net, optimizer = wide_net()
    ema = torch.nn.Linear(4, 4)
    path = str(tmp_path / "model.h5")
    torch.save({"model_state_dict": net.state_dict()}, path)
    with open(path, "rb") as stream:
        contents = memoryview(stream.read())
    objects = {"model": net, "ema": ema, "optimizer": optimizer}
    with pytest.raises(candle_ckpt.CheckpointFormatError, match="does not load every module"):
        state.restore_upstream(objects, path, contents, overwritten={"ema"})
    state.restore_upstream(objects, path, contents, overwritten={"model"})


def test_a_plan_for_another_file_is_refused_before_anything_loads(trained, tmp_path):
    params, _, _ = trained
    fresh, fresh_optimizer = wide_net(seed=7)
    objects = {"model": fresh, "optimizer": fresh_optimizer}
    with open(model_file(params, 1), "rb") as stream:
        plan = state.plan_in_place(objects, model_file(params, 1), stream)
    assert len(plan.targets) == 1
    moved = {k + 1: target for k, target in plan.targets.items()}
    before = values(fresh, fresh_optimizer)
    contents = checksum.read_file(model_file(params, 2))[0]
    with pytest.raises(candle_ckpt.CheckpointFormatError, match="changed while it was read"):
        state.restore(objects, model_file(params, 2), contents, None, state.InPlaceRead("x", moved))
    assert_equal(before, values(fresh, fresh_optimizer))
