"""A Keras restart reads the checker's listing of the model file, never the file through
HDF5: the listing says what h5py says of the file, refuses what the checker refuses,
and a listing made for the in-place read is used again only for the same bytes."""

import h5py
import numpy as np
import pytest
from keras_helpers import fit_checkpointed
from test_keras_h5 import assert_bit_equal, dense_adam, save, state, trained
from test_keras_in_place import batch, wide_model
from test_keras_restart import params_for
from test_model_file_bounds import CRAFTED, torch_file

import candle_ckpt
from candle_ckpt import hdf5_check
from candle_ckpt.core.errors import CheckpointFormatError
from candle_ckpt.core.storage import checksum
from candle_ckpt.keras import h5 as keras_h5

keras = pytest.importorskip("keras")


def h5py_view(path):
    """{path: (offset, shape, dtype) or attributes} of every object, as h5py reads them."""
    found = {}

    def visit(name, node):
        if isinstance(node, h5py.Dataset):
            found[name] = (node.id.get_offset() or 0, node.shape, node.dtype)
        found[name + "@"] = {key: node.attrs[key] for key in node.attrs}

    with h5py.File(path, "r") as f:
        f.visititems(visit)
        found["@"] = {key: f.attrs[key] for key in f.attrs}
    return found


def listed_view(root):
    found = {}
    pending = [root]
    while pending:
        node = pending.pop()
        name = node.name.lstrip("/")
        found[name + "@"] = node.attrs
        if isinstance(node, hdf5_check.StoredArray):
            found[name] = (node.offset, node.shape, node.dtype)
        else:
            pending += node.members.values()
    return found


def same_value(listed, read):
    if isinstance(read, bytes):
        return listed == read.decode()
    if isinstance(read, np.ndarray) and read.dtype.kind in "SO":
        return list(listed) == [v.decode() if isinstance(v, bytes) else v for v in read]
    return np.array_equal(np.asarray(listed), np.asarray(read))


def test_the_listing_says_what_h5py_reads(tmp_path):
    path = save(trained(dense_adam), tmp_path)
    listed = listed_view(hdf5_check.list_model_file(path.read_bytes(), str(path)).root)
    read = h5py_view(path)
    assert listed.keys() == read.keys()
    for name, value in read.items():
        if name.endswith("@"):
            long = hdf5_check._LISTED_STRING_BYTES  # a longer string is left out
            expected = {k: v for k, v in value.items() if not isinstance(v, str) or len(v) <= long}
            assert listed[name].keys() == expected.keys(), name
            assert all(same_value(listed[name][k], v) for k, v in expected.items()), name
        else:
            assert listed[name] == value, name


def test_restore_parses_nothing_with_hdf5_in_this_process(tmp_path, monkeypatch):
    original = trained(dense_adam)
    path = save(original, tmp_path)

    def no_hdf5(*args, **kwargs):
        raise AssertionError("h5py.File opened in the restarting process")

    monkeypatch.setattr(h5py, "File", no_hdf5)
    fresh = dense_adam()
    keras_h5.restore(fresh, path)
    assert_bit_equal(state(original), state(fresh))


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_the_listing_refuses_what_the_check_refuses(tmp_path, case):
    make, fragment = CRAFTED[case]
    path = str(tmp_path / "model.h5")
    contents = torch_file(path, {"0.weight": make})
    with pytest.raises(CheckpointFormatError, match=fragment) as refused:
        hdf5_check.list_model_file(contents, path)
    assert path in str(refused.value)


def test_a_group_reached_twice_is_refused(tmp_path):
    path = save(trained(dense_adam), tmp_path)
    with h5py.File(path, "r+") as f:
        layer = f["model_weights"].attrs["layer_names"][-1].decode()
        f["model_weights/again"] = f["model_weights"][layer]
    with pytest.raises(CheckpointFormatError, match="reached twice"):
        keras_h5.restore(dense_adam(), path)


def test_a_listing_is_used_again_only_for_the_bytes_it_was_made_from(tmp_path):
    path = save(wide_model(), tmp_path)
    contents = bytearray(path.read_bytes())
    listing = hdf5_check.list_model_file(bytes(contents), str(path))
    assert listing.reads.found_in(contents)
    read = np.zeros(len(contents), bool)
    for offset, length, _ in listing.reads.pieces:
        read[offset : offset + length] = True
    # a byte the checker did not read (a large dataset's values): the same listing
    unread = int(np.flatnonzero(~read)[0])
    changed = bytearray(contents)
    changed[unread] ^= 1
    assert listing.reads.found_in(changed)
    # bytes read elsewhere (into a variable's buffer) are taken from there
    region = slice(1000, 300_000)
    elsewhere = np.frombuffer(bytes(contents[region]), np.uint8).copy()
    left_out = bytearray(contents)
    left_out[region] = bytes(len(elsewhere))
    assert not listing.reads.found_in(left_out)
    assert listing.reads.found_in(left_out, [(region.start, elsewhere)])
    elsewhere[5000] ^= 1
    assert not listing.reads.found_in(left_out, [(region.start, elsewhere)])
    # any byte the checker read, changed, or another size: listed anew
    for offset, length, _ in listing.reads.pieces:
        header = bytearray(contents)
        header[offset + length // 2] ^= 1
        assert not listing.reads.found_in(header)
    assert not listing.reads.found_in(contents + b"\0")


def test_a_restart_reading_in_place_lists_the_file_once(tmp_path, monkeypatch):
    monkeypatch.setattr(checksum, "IN_PLACE_MIN_BYTES", 0)
    params = params_for(tmp_path, ckpt_save_best=False)
    x, y = batch()
    fit_checkpointed(wide_model(), params, x, y.astype("float32"), 1, 0)
    listed = []
    real_list = keras_h5.list_model_file
    monkeypatch.setattr(
        keras_h5, "list_model_file", lambda *args: listed.append(args) or real_list(*args)
    )
    fresh = wide_model(seed=5)
    assert candle_ckpt.restart(params, fresh, verbose=False)["epoch"] == 1
    assert len(listed) == 1


def test_an_error_of_the_early_work_is_raised_once_the_checker_is_done(tmp_path):
    path = save(trained(dense_adam), tmp_path)
    contents = path.read_bytes()
    places = []

    def fails(place):
        places.append(place)
        raise RuntimeError("early work failed")

    with pytest.raises(RuntimeError, match="early work failed"):
        hdf5_check.list_model_file(contents, str(path), fails)
    assert len(places) == 1  # not called again after it failed
    checker = hdf5_check._checker.pid
    seen = []
    listing = hdf5_check.list_model_file(contents, str(path), seen.append)
    assert hdf5_check._checker.pid == checker  # in step with this process: kept
    stored = [node for node in listed_view(listing.root).values() if isinstance(node, tuple)]
    assert sorted(seen) == sorted(
        [[offset, list(shape), dtype.str] for offset, shape, dtype in stored]
    )


def test_damaged_headers_load_or_are_refused_leaving_the_model_untouched(tmp_path):
    """Bytes flipped where the checker reads (HDF5's headers, names, attributes): each
    restore loads the file or refuses it with a CheckpointFormatError, the model as it
    was; never another exception."""
    original = trained(dense_adam)
    path = save(original, tmp_path)
    pristine = path.read_bytes()
    read = hdf5_check.list_model_file(pristine, str(path)).reads.pieces
    rng = np.random.default_rng(35)
    fresh = dense_adam()
    before = state(fresh)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(120):
        offset, length, _ = read[rng.integers(len(read))]
        damaged = bytearray(pristine)
        damaged[offset + rng.integers(length)] ^= 1 << int(rng.integers(8))
        try:
            keras_h5.restore(fresh, path, contents=memoryview(bytes(damaged)))
        except CheckpointFormatError:
            outcomes["refused"] += 1
            assert_bit_equal(before, state(fresh))
        else:
            outcomes["loaded"] += 1  # a flip in a value, or one HDF5 does not read
            keras_h5.restore(fresh, path, contents=memoryview(pristine))
            before = state(fresh)
    assert outcomes["refused"] > 0
