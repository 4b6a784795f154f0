"""The PyTorch model file, in process: exact round trips, validation first, no unpickling."""

import io
import logging
import os
import random
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import candle_ckpt  # noqa: E402
from candle_ckpt.core.errors import CheckpointFormatError  # noqa: E402
from candle_ckpt.core.storage.checksum import read_file  # noqa: E402
from candle_ckpt.pytorch import state  # noqa: E402
from candle_ckpt.pytorch.adapter import TorchAdapter  # noqa: E402

LOG = logging.getLogger("test")


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1)
    )


def trained(seed=0, steps=3):
    model = net(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "generator": torch.Generator().manual_seed(seed + 3),
        "scaler": torch.amp.GradScaler("cpu", init_scale=256.0),
    }


def save(objects, tmp_path, weights_only=False, copy=False):
    snap = state.snapshot(objects, weights_only, copy=copy)
    path = str(tmp_path / "model.h5")
    state.write(snap, path)
    with open(path, "rb") as stream:
        return path, memoryview(stream.read())


def same(a, b):
    """Equal, with equal types all the way down (int vs float vs bool), tensors bitwise."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert type(key) is type(next(k for k in b if k == key))
            same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b or (a != a and b != b)


def test_every_state_round_trips_exactly_types_included(tmp_path):
    objects = trained()
    path, contents = save(objects, tmp_path)
    loaded, weights_only = state.read(contents, path)
    assert not weights_only
    for name, value in state.object_states(objects, False).items():
        same(value, loaded["objects"][name])
    optimizer = loaded["objects"]["optimizer"]
    assert all(type(k) is int for k in optimizer["state"])
    group = optimizer["param_groups"][0]
    assert type(group["betas"]) is tuple and group["foreach"] is None
    assert type(group["amsgrad"]) is bool and type(group["lr"]) is float
    assert loaded["objects"]["model"]._metadata == objects["model"].state_dict()._metadata
    same(state.rng_states(), loaded["rng"])


def test_odd_values_round_trip(tmp_path):
    odd = {
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 2),
        "bool": torch.ones(2) > 0,
        "array": np.arange(3, dtype=np.int16),
        "np_scalar": np.float32(2.5),
        "nan": float("nan"),
        "inf": float("-inf"),
        "big": 2**70,
        "none": None,
        3: "int key",
        (1, 2): [1, 1.0, True, None, "s"],
        "dtype": torch.float16,
        "noncontiguous": torch.arange(12.0).reshape(3, 4).t(),
    }
    path, contents = save({"odd": _Holder(odd)}, tmp_path)
    loaded = state.read(contents, path)[0]["objects"]["odd"]
    expected = dict(odd, np_scalar=2.5, noncontiguous=odd["noncontiguous"].contiguous())
    same(expected, loaded)


def test_a_value_that_would_need_pickle_is_refused_at_save_time(tmp_path):
    holder = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1), lambda e: 1.0
    )
    holder.__dict__["custom"] = object()
    with pytest.raises(
        CheckpointFormatError, match=r"state\['scheduler'\]\['custom'\]: a builtins.object"
    ):
        state.snapshot({"scheduler": holder})


def test_restore_is_exact_and_sets_the_random_states(tmp_path):
    objects = trained(seed=0)
    path, contents = save(objects, tmp_path)
    expected_rng = torch.rand(3), np.random.rand(), random.random()
    fresh = trained(seed=1, steps=1)
    restored = state.restore(fresh, path, contents, LOG)
    assert restored.exact and restored.parts[-1] == "RNG"
    same(state.object_states(objects, False), state.object_states(fresh, False))
    same(expected_rng, (torch.rand(3), np.random.rand(), random.random()))


def large(seed=0):
    """A model whose weights and AdamW moments are large enough (128 KiB each) to be
    written in place by pwrite and restored in place."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(256, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    step(model, opt, torch.randn(16, 256))
    return {"model": model, "optimizer": opt}


def step(model, opt, x):
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def inside(tensor, buffer):
    start = np.frombuffer(buffer, np.uint8, 1).ctypes.data
    return start <= tensor.data_ptr() < start + buffer.nbytes


def test_restore_from_the_verified_read_buffer_uses_it_in_place_and_training_goes_on(tmp_path):
    objects = large()
    path = str(tmp_path / "model.h5")
    state.write(state.snapshot(objects, copy=False), path)
    contents, _ = read_file(path)
    fresh = large(seed=1)
    parameter = fresh["model"].weight
    state.restore(fresh, path, contents, LOG)
    same(state.object_states(objects, False), state.object_states(fresh, False))
    # The parameters keep their own memory (the optimizer refers to them); the
    # optimizer's moments are the verified bytes themselves, not a copy of them.
    assert fresh["model"].weight is parameter and not inside(parameter, contents)
    moment = fresh["optimizer"].state_dict()["state"][0]["exp_avg"]
    assert inside(moment, contents) and moment.numel() * 4 >= 64 << 10
    x = torch.randn(16, 256)
    for _ in range(2):
        step(objects["model"], objects["optimizer"], x)
        step(fresh["model"], fresh["optimizer"], x)
    same(state.object_states(objects, False), state.object_states(fresh, False))


def test_a_file_whose_data_is_not_aligned_restores(tmp_path, monkeypatch):
    """Without HDF5's alignment (as files of earlier releases, or of other writers, may
    be laid out) no tensor is on its boundary in memory: each is copied."""
    import h5py

    monkeypatch.setattr(state, "create_file", lambda image: h5py.File(image, "w"))
    objects = large()
    path = str(tmp_path / "model.h5")
    state.write(state.snapshot(objects, copy=False), path)
    with h5py.File(path, "r") as f:
        assert f[state.DATA].id.get_offset() % 64
    contents, _ = read_file(path)
    fresh = large(seed=1)
    state.restore(fresh, path, contents, LOG)
    same(state.object_states(objects, False), state.object_states(fresh, False))


def test_a_mismatch_anywhere_changes_nothing(tmp_path):
    objects = trained()
    path, contents = save(objects, tmp_path)
    other = trained(seed=5)
    other["model"][3] = torch.nn.Linear(8, 2)  # the last entry checked for the model
    before = {k: v.clone() for k, v in other["model"].state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointFormatError, match=r"'3.weight'.*\(1, 8\).*\(2, 8\)"):
        state.restore(other, path, contents, LOG)
    assert all(torch.equal(before[k], v) for k, v in other["model"].state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    fewer = dict(trained())
    del fewer["scheduler"]
    with pytest.raises(CheckpointFormatError, match="Register the same objects"):
        state.restore(fewer, path, contents, LOG)


def test_weights_only_restores_the_modules_and_says_it_is_inexact(tmp_path):
    objects = trained()
    path, contents = save(objects, tmp_path, weights_only=True)
    fresh = trained(seed=2)
    restored = state.restore(fresh, path, contents, LOG)
    assert restored.parts == ("model",) and not restored.exact
    same(objects["model"].state_dict(), fresh["model"].state_dict())


def test_a_copy_is_independent_of_later_training(tmp_path):
    objects = trained()
    first = state.snapshot(objects, copy=True)
    weights = objects["model"][0].weight.detach().clone()
    with torch.no_grad():
        objects["model"][0].weight.add_(1)
    assert np.array_equal(first.arrays[0], weights.numpy())
    again = state.snapshot(objects, copy=True, into=first)
    assert again.block is first.block  # memory reused
    assert np.shares_memory(again.arrays[0], first.arrays[0])
    assert np.array_equal(again.arrays[0], objects["model"][0].weight.detach().numpy())
    adapter = TorchAdapter(objects)
    assert adapter.state_nbytes() == again.nbytes


class Payload:
    """Unpickling this runs os.mkdir(path): what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_pickle_with_a_reduce_payload_is_refused_and_never_runs(tmp_path):
    marker = str(tmp_path / "payload-ran")
    buffer = io.BytesIO()
    torch.save({"model_state_dict": {"w": torch.ones(1)}, "evil": Payload(marker)}, buffer)
    model = {"model": torch.nn.Linear(1, 1)}
    with pytest.raises(CheckpointFormatError, match="safe loader refused it"):
        state.restore(model, "model.h5", memoryview(buffer.getvalue()), LOG)
    assert not os.path.exists(marker)
    # the same bytes through a full unpickling would have run it: the test can fail
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert os.path.isdir(marker)


def test_a_keras_file_is_not_taken_for_ours(tmp_path):
    import h5py

    path = str(tmp_path / "model.h5")
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "3"
    with open(path, "rb") as stream:
        contents = memoryview(stream.read())
    with pytest.raises(CheckpointFormatError, match="not written by candle_ckpt's PyTorch"):
        state.restore({"model": net()}, path, contents, LOG)


def test_pytorch_names_load_lazily():
    assert candle_ckpt.CandleCkptPyTorch.__module__ == "candle_ckpt.pytorch.ckpt"
    assert issubclass(candle_ckpt.CheckpointWriteError, OSError)


def test_set_model_takes_upstreams_net_key_and_refuses_other_values(tmp_path):
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {"ckpt_directory": str(tmp_path), "epochs": 1}, verbose=False
    )
    model = net()
    ckpt.set_model({"net": model, "optimizer": torch.optim.SGD(model.parameters(), 0.1)})
    assert list(ckpt.model) == ["model", "optimizer"]
    with pytest.raises(TypeError, match="entry 'lr'.*float"):
        ckpt.set_model({"model": model, "lr": 0.1})
    with pytest.raises(RuntimeError, match="set_model"):
        candle_ckpt.CandleCkptPyTorch(
            {"ckpt_directory": str(tmp_path), "epochs": 1}, verbose=False
        ).restart()


class _Holder:
    """A registered object whose state dict is any value."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, value):
        self.value = value


def odd_sized_objects():
    """Large tensors whose bytes end mid-block, one with no numpy dtype, empty ones, many
    small ones below the alignment threshold, and a module with an optimizer."""
    generator = torch.Generator().manual_seed(7)
    values = {
        "tail": torch.randn(70001, generator=generator),  # 280004 bytes: a 1220-byte tail
        "bf16": torch.randn(3, 40001, generator=generator).to(torch.bfloat16),
        "empty": torch.zeros(0, 4096),
        "empty_array": np.zeros((5, 0), np.float64),
        "array": np.arange(50001, dtype=np.int16),
        "small": [torch.full((k,), float(k)) for k in range(1, 300)],
    }
    objects = trained()
    objects["holder"] = _Holder(values)
    return objects


@pytest.mark.parametrize("copy", [True, False])
def test_the_crc_from_memory_is_the_files(tmp_path, copy, o_direct):
    """The CRC32 `write` computes from memory and the layout read back equals zlib's over
    the file's bytes, for a snapshot (its block written whole with O_DIRECT from where
    it is) and for views of the live tensors (the large ones through the bounce buffer,
    the small ones packed): odd sizes, empty and many small tensors."""

    objects = odd_sized_objects()
    snap = state.snapshot(objects, copy=copy)
    large = [a for a in snap.arrays if a.nbytes >= 64 << 10]
    assert len(large) == 3
    if copy:  # carved out of one block, each on a page boundary
        assert all(a.ctypes.data % 4096 == 0 for a in large)
    path = str(tmp_path / "model.h5")
    written = state.write(snap, path)
    with open(path, "rb") as stream:
        contents = stream.read()
    assert written.crc32 == zlib.crc32(contents)
    direct = o_direct(os.path.dirname(path))
    if copy:
        assert written.nbytes == snap.data_nbytes
        assert written.direct_bytes == (snap.data_nbytes // 4096 * 4096 if direct else 0)
    else:
        assert sum(a.nbytes for a in snap.arrays) <= written.nbytes <= snap.data_nbytes
        blocks = sum(a.nbytes - a.nbytes % 4096 for a in large)
        assert (written.direct_bytes >= blocks) if direct else written.direct_bytes == 0
    loaded, _ = state.read(memoryview(contents), path)
    same(state.object_states(objects, False), loaded["objects"])


def test_a_copy_into_an_earlier_snapshot_stays_aligned(tmp_path):
    objects = odd_sized_objects()
    first = state.snapshot(objects, copy=True)
    second = state.snapshot(objects, copy=True, into=first)
    large = [k for k, a in enumerate(first.arrays) if a.nbytes >= 64 << 10]
    assert second.block is first.block
    assert all(second.arrays[k].ctypes.data == first.arrays[k].ctypes.data for k in large)
    assert all(second.arrays[k].ctypes.data % 4096 == 0 for k in large)
