"""The PyTorch model file's version 2 (`torch-h5/2`): every tensor in one `data`
dataset, described by the JSON's table, which is checked whole (dtypes, sizes, bounds,
overlaps) before anything is loaded; and version 1 files, as earlier releases wrote
them, still restore."""

import copy
import json
import logging
import os
import zlib

import h5py
import numpy as np
import pytest
from test_pytorch_state import same

torch = pytest.importorskip("torch")

from candle_ckpt.core.errors import CheckpointFormatError  # noqa: E402
from candle_ckpt.core.storage import checksum  # noqa: E402
from candle_ckpt.core.storage.checksum import RegionPlanner, read_file  # noqa: E402
from candle_ckpt.pytorch import state  # noqa: E402

LOG = logging.getLogger("test")
V1_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torch-h5-1.h5")


def fixed_objects():
    """A model (its first weight 64 KiB: read in place), its AdamW with state and a
    generator, all of fixed values: what tests/fixtures/torch-h5-1.h5 holds."""
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 128), torch.nn.BatchNorm1d(128), torch.nn.Linear(128, 3)
    )
    with torch.no_grad():
        for k, tensor in enumerate(model.state_dict().values()):
            if tensor.is_floating_point():
                values = torch.arange(tensor.numel(), dtype=tensor.dtype) * 0.001 + k
                tensor.copy_(values.reshape(tensor.shape))
            else:
                tensor.fill_(k)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    saved = optimizer.state_dict()
    saved["state"] = {
        k: {"step": torch.tensor(3.0), "exp_avg": p.detach() * 0.5, "exp_avg_sq": p.detach() ** 2}
        for k, p in enumerate(model.parameters())
    }
    optimizer.load_state_dict(saved)
    return {"model": model, "optimizer": optimizer, "generator": torch.Generator().manual_seed(11)}


def read_bytes(path):
    with open(path, "rb") as stream:
        return memoryview(stream.read())


def test_a_version_1_file_of_the_previous_release_still_restores_exactly(monkeypatch):
    """tests/fixtures/torch-h5-1.h5 was written by the version 1 writer (one dataset
    per tensor) from `fixed_objects`; read with the in-place plan and without."""
    monkeypatch.setattr(checksum, "IN_PLACE_MIN_BYTES", 0)
    contents = read_bytes(V1_FIXTURE)
    with h5py.File(V1_FIXTURE, "r") as f:
        assert f.attrs[state.FORMAT_ATTR] == 1 and "tensors" in f and state.DATA not in f
    expected = fixed_objects()
    loaded, weights_only = state.read(contents, V1_FIXTURE)
    assert not weights_only
    same(state.object_states(expected, False), loaded["objects"])

    fresh = scrambled()
    state.restore(fresh, V1_FIXTURE, contents, LOG)
    same(state.object_states(expected, False), state.object_states(fresh, False))

    fresh = scrambled()
    weight = fresh["model"][0].weight
    with open(V1_FIXTURE, "rb") as stream:
        plan = state.plan_in_place(fresh, V1_FIXTURE, stream)
    assert [target.key for target in plan.targets.values()] == ["0.weight"]
    contents, _ = checksum.read_file(
        V1_FIXTURE,
        read_into=RegionPlanner(lambda *_: plan.regions),
        expected_crc=zlib.crc32(read_bytes(V1_FIXTURE)),
    )
    state.restore(fresh, V1_FIXTURE, contents, LOG, plan)
    assert fresh["model"][0].weight is weight
    same(state.object_states(expected, False), state.object_states(fresh, False))


def scrambled():
    """`fixed_objects` of other values: what a restart loads into."""
    objects = fixed_objects()
    with torch.no_grad():
        for tensor in objects["model"].state_dict().values():
            tensor.add_(7)
    objects["generator"].manual_seed(99)
    return objects


def test_the_writer_writes_version_2_one_data_dataset_every_tensor_on_its_boundary(tmp_path):
    path = str(tmp_path / "model.h5")
    snap = state.snapshot(fixed_objects(), copy=True)
    state.write(snap, path)
    with h5py.File(path, "r") as f:
        assert f.attrs[state.FORMAT_ATTR] == 2 and sorted(f) == ["data", "state"]
        start = f[state.DATA].id.get_offset()
        table = json.loads(f["state"][()].tobytes())["tensors"]
    assert start % 4096 == 0
    for _, _, offset, nbytes in table:
        assert offset % (4096 if nbytes >= 64 << 10 else 64) == 0
    # in place on the verified read: the optimizer's moments are the read bytes
    contents, _ = read_file(path)
    fresh = scrambled()
    state.restore(fresh, path, contents, LOG)
    moment = fresh["optimizer"].state_dict()["state"][1]["exp_avg"]
    start_of = np.frombuffer(contents, np.uint8, 1).ctypes.data
    assert start_of <= moment.data_ptr() < start_of + len(contents)
    same(state.object_states(fixed_objects(), False), state.object_states(fresh, False))


def rewritten(tmp_path, change):
    """A version 2 file of `fixed_objects` whose JSON `change(encoded, data length)`
    edited (its 'state' dataset replaced), as bytes."""
    path = str(tmp_path / "model.h5")
    state.write(state.snapshot(fixed_objects(), copy=False), path)
    with h5py.File(path, "r+") as f:
        encoded = json.loads(f["state"][()].tobytes())
        change(encoded, f[state.DATA].size)
        del f["state"]
        f.create_dataset("state", data=np.frombuffer(json.dumps(encoded).encode(), np.uint8))
    return path, read_bytes(path)


def weight_entry(encoded):
    """The table entry of the model's first weight (tensor 0)."""
    return encoded["tensors"][0]


def set_in(position, value):
    def change(encoded, length):
        weight_entry(encoded)[position] = value(length) if callable(value) else value

    return change


def overlapping(encoded, length):
    encoded["tensors"][1][2] = weight_entry(encoded)[2] + 64


def duplicate_offsets(encoded, length):
    """A moment described as the very bytes of the weight (dtype, shape and all)."""
    moment = next(
        k for k, e in enumerate(encoded["tensors"]) if k and e[:2] == weight_entry(encoded)[:2]
    )
    encoded["tensors"][moment] = list(weight_entry(encoded))


CRAFTED_TABLES = {
    "offset past the data": (set_in(2, lambda length: length), "the data dataset holds"),
    "offset negative": (set_in(2, -64), "expected [dtype name, [sizes], offset, bytes]"),
    "offset a float": (set_in(2, 0.0), "expected [dtype name, [sizes], offset, bytes]"),
    "offset a bool": (set_in(3, True), "expected [dtype name, [sizes], offset, bytes]"),
    "bytes short": (set_in(3, 64), "is described as 64 bytes"),
    "bytes huge": (set_in(3, 2**62), "is described as"),
    "shape of the bytes": (set_in(1, [64, 128]), "of shape (64, 128) is 32768 bytes"),
    "shape huge": (set_in(1, [2**62, 2**62]), "is described as"),
    "too many dimensions": (set_in(1, [1] * 33), "expected [dtype name"),
    "dtype unknown": (set_in(0, "tensor"), "expected a torch dtype name"),
    "dtype quantized": (set_in(0, "qint8"), "expected a torch dtype name"),
    "dtype of objects": (set_in(0, "numpy:O"), "expected a numpy dtype of numbers"),
    "dtype of strings": (set_in(0, "numpy:<U4"), "expected a numpy dtype of numbers"),
    "dtype big-endian": (set_in(0, "numpy:>f4"), "in this machine's byte order"),
    "overlapping": (overlapping, "overlaps tensor 0"),
    "sharing bytes": (duplicate_offsets, "overlaps"),
    "entry short": (lambda encoded, length: weight_entry(encoded).pop(), "expected [dtype"),
    "table not a list": (lambda encoded, length: encoded.update(tensors={}), "expected a list"),
    "no byte order": (lambda encoded, length: encoded.pop("byteorder"), "expected a dict"),
    "other byte order": (
        lambda encoded, length: encoded.update(byteorder="middle"),
        "another byte order",
    ),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_TABLES))
def test_a_crafted_table_is_refused_before_anything_loads(tmp_path, case):
    change, fragment = CRAFTED_TABLES[case]
    path, contents = rewritten(tmp_path, change)
    fresh = scrambled()
    before = copy.deepcopy(state.object_states(fresh, False))
    with pytest.raises(CheckpointFormatError) as refused:
        state.restore(fresh, path, contents, LOG)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)
    same(before, state.object_states(fresh, False))
    with open(path, "rb") as stream:
        assert state.plan_in_place(fresh, path, stream).targets == {}


def test_a_data_dataset_of_another_type_is_refused(tmp_path):
    path = str(tmp_path / "model.h5")
    state.write(state.snapshot(fixed_objects(), copy=False), path)
    with h5py.File(path, "r+") as f:
        values = f[state.DATA][()]
        del f[state.DATA]
        f.create_dataset(state.DATA, data=values.view(np.float32))
    with pytest.raises(CheckpointFormatError, match="expected one run of uint8 bytes"):
        state.read(read_bytes(path), path)


def test_an_older_reader_refuses_a_version_2_file_naming_the_version(tmp_path, monkeypatch):
    """What the previous release (reading version 1 only) does with a version 2 file."""
    path = str(tmp_path / "model.h5")
    state.write(state.snapshot(fixed_objects(), copy=False), path)
    monkeypatch.setattr(state, "FORMAT_VERSION", 1)
    with pytest.raises(
        CheckpointFormatError, match="version is 2; this candle_ckpt reads versions 1 to 1"
    ):
        state.read(read_bytes(path), path)


def test_modules_that_load_their_own_way_go_through_load_state_dict(tmp_path):
    """BatchNorm's own _load_from_state_dict, and a hook, are honoured; a plain module
    is copied into without load_state_dict, with the same result."""
    path = str(tmp_path / "model.h5")
    objects = fixed_objects()
    state.write(state.snapshot(objects, copy=False), path)
    contents = read_bytes(path)
    calls = []
    fresh = scrambled()
    fresh["model"][2].register_load_state_dict_post_hook(lambda module, keys: calls.append(1))
    state.restore(fresh, path, contents, LOG)
    assert calls == [1]
    same(state.object_states(objects, False), state.object_states(fresh, False))

    plain = {"model": torch.nn.Sequential(torch.nn.Linear(128, 128))}
    saved = {"model": torch.nn.Sequential(torch.nn.Linear(128, 128))}
    state.write(state.snapshot(saved, copy=False), path)
    weight = plain["model"][0].weight
    real = torch.nn.Module.load_state_dict
    try:
        torch.nn.Module.load_state_dict = None  # the plain path must not call it
        state.restore(plain, path, read_bytes(path), LOG)
    finally:
        torch.nn.Module.load_state_dict = real
    assert plain["model"][0].weight is weight
    same(state.object_states(saved, False), state.object_states(plain, False))


def test_tied_weights_and_non_persistent_buffers_load_as_load_state_dict_loads_them(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(8, 4)
            self.out = torch.nn.Linear(4, 8, bias=False)
            self.out.weight = self.embed.weight
            self.register_buffer("scratch", torch.zeros(3), persistent=False)

    torch.manual_seed(0)
    saved = {"model": Tied()}
    path = str(tmp_path / "model.h5")
    state.write(state.snapshot(saved, copy=False), path)
    torch.manual_seed(1)
    fresh = {"model": Tied()}
    fresh["model"].scratch.fill_(5)
    assert state._loads_plainly(fresh["model"])
    state.restore(fresh, path, read_bytes(path), LOG)
    assert fresh["model"].out.weight is fresh["model"].embed.weight
    assert torch.equal(fresh["model"].embed.weight, saved["model"].embed.weight)
    assert torch.equal(fresh["model"].scratch, torch.full((3,), 5.0))  # not in the file


def test_a_refusal_of_the_table_names_the_entries_of_the_state(tmp_path):
    path, contents = rewritten(tmp_path, overlapping)
    with pytest.raises(CheckpointFormatError) as refused:
        state.read(contents, path)
    assert (
        "tensor 1 of '/data' (objects['model']['0.bias']) overlaps tensor 0 "
        "(objects['model']['0.weight'])"
    ) in str(refused.value)
    path, contents = rewritten(tmp_path, set_in(0, "numpy:O"))
    with pytest.raises(CheckpointFormatError, match=r"tensor 0 of '/data' \(objects\['model'\]"):
        state.read(contents, path)


@pytest.mark.parametrize("copy", [True, False])
def test_a_state_without_tensors_round_trips(tmp_path, copy):
    objects = {"model": torch.nn.ReLU()}
    path = str(tmp_path / "model.h5")
    snap = state.snapshot(objects, weights_only=True, copy=copy)
    assert snap.data_nbytes == 0
    state.write(snap, path)
    restored = state.restore(objects, path, read_bytes(path), LOG)
    assert restored.parts == ("model",)
