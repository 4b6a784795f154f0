"""A crafted Keras model file, resealed as anyone who can write the tree can (its CRC32
and ckpt-info.json's `info_crc32` recomputed), is refused whole: a
CheckpointFormatError in one line naming the variable, and the model's weights,
optimizer variables and SeedGenerator states exactly as they were (issue 34, finding 1).

Each case restarts with the in-place read on (the kernel and its Adam slots, 128 KiB
each, read straight into the variables) and off. The in-place read checks its whole
plan, every dataset `restore` will read, before it writes the first variable.
"""

import os

import h5py
import numpy as np
import pytest
from conftest import reseal
from keras_helpers import fit_checkpointed
from test_keras_restart import params_for

import candle_ckpt
from candle_ckpt.core.storage import checksum
from candle_ckpt.hdf5 import read_names
from candle_ckpt.keras import h5 as keras_h5

keras = pytest.importorskip("keras")


def model_with_rng(seed=1):
    """A kernel (and its Adam slots) of 128 KiB, and a Dropout's SeedGenerator."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((256,)),
            keras.layers.Dense(128),
            keras.layers.Dropout(0.1, seed=3),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.fixture(scope="module")
def good_tree(tmp_path_factory):
    params = params_for(tmp_path_factory.mktemp("keras-all-or-nothing"), ckpt_save_best=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 256)).astype("float32")
    y = rng.standard_normal((32, 1)).astype("float32")
    fit_checkpointed(model_with_rng(), params, x, y, 2)
    return params


@pytest.fixture
def params(good_tree, tmp_path):
    import shutil

    root = str(tmp_path / "save")
    shutil.copytree(good_tree["ckpt_directory"], root, symlinks=True)
    return {**good_tree, "ckpt_directory": root}


def craft(params, change):
    """Apply `change(f)` to epoch 2's model.h5 (open r+), then reseal its CRC32 and
    ckpt-info.json."""
    directory = os.path.join(params["ckpt_directory"], "ckpts", "epochs", "002")
    path = os.path.join(directory, "model.h5")
    with h5py.File(path, "r+") as f:
        change(f)
    reseal(directory)


def replace(group, name, **create):
    """Dataset `name` of `group` created anew, by h5py's `create_dataset(**create)`."""
    del group[name]
    return group.create_dataset(name, **create)


def last_optimizer_variable(f):
    """The name, and the values, of the last variable of the optimizer: read after the
    weights and after the large variables read in place."""
    group = f["optimizer_weights"]
    name = read_names(group, "weight_names")[-1]
    return group, name, group[name][()]


def a_compressed_variable_that_does_not_inflate(f):
    group, name, values = last_optimizer_variable(f)
    created = replace(group, name, data=values, chunks=True, compression="gzip")
    info = created.id.get_chunk_info(0)
    f.flush()
    # the chunk's deflate stream, damaged (HDF5 says so only when it reads it)
    with open(f.filename, "r+b") as stream:
        stream.seek(info.byte_offset)
        stream.write(b"\xff" * info.size)


def an_optimizer_variable_of_another_shape(f):
    group, name, values = last_optimizer_variable(f)
    replace(group, name, data=np.resize(values, values.size + 1).astype(values.dtype))


def a_big_endian_optimizer_variable(f):
    group, name, values = last_optimizer_variable(f)
    replace(group, name, data=values.astype(values.dtype.newbyteorder(">")))


def a_seed_state_of_another_dtype(f):
    group = f["candle_ckpt_rng"]
    name = read_names(group, "weight_names")[0]
    replace(group, name, data=group[name][()].astype("float32"))


CASES = {
    "does-not-inflate": (
        a_compressed_variable_that_does_not_inflate,
        "is chunked (candle_ckpt writes contiguous datasets)",
    ),
    "other-shape": (an_optimizer_variable_of_another_shape, "float32 of shape (2,) in the file"),
    "big-endian": (a_big_endian_optimizer_variable, "native byte order"),
    "seed-dtype": (a_seed_state_of_another_dtype, "(SeedGenerator states), variable"),
}


def everything(model):
    return [np.array(v.numpy()) for v in model.variables + model.optimizer.variables]


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copied"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_variable_is_refused_and_nothing_changes(params, monkeypatch, in_place, case):
    if in_place:
        monkeypatch.setattr(checksum, "IN_PLACE_MIN_BYTES", 0)
    change, fragment = CASES[case]
    craft(params, change)
    model = model_with_rng(seed=7)
    before = everything(model)
    with pytest.raises(candle_ckpt.CheckpointFormatError) as refused:
        candle_ckpt.restart(params, model, verbose=False)
    message = str(refused.value)
    assert fragment in message and "\n" not in message
    after = everything(model)
    assert len(before) == len(after)
    for was, now in zip(before, after):
        np.testing.assert_array_equal(was, now)


def test_the_resealed_tree_unchanged_restarts_in_place(params, monkeypatch):
    """The crafting itself leaves a file that restarts, its kernel and Adam slots read
    in place: what the cases refuse is theirs, and on that path."""
    from candle_ckpt.keras import h5

    planned = []
    real = h5.plan_in_place

    def noting(*args):
        planned.append(real(*args))
        return planned[-1]

    monkeypatch.setattr(h5, "plan_in_place", noting)
    monkeypatch.setattr(checksum, "IN_PLACE_MIN_BYTES", 0)
    craft(params, lambda f: None)
    assert candle_ckpt.restart(params, model_with_rng(seed=7), verbose=False)["epoch"] == 2
    assert len(planned[0].offsets) == 3


def test_a_variable_that_fails_to_assign_after_the_checks_says_what_is_loaded(params, monkeypatch):
    model = model_with_rng(seed=7)
    last = model.optimizer.variables[-1]

    real_assign = keras_h5._assign

    def refuse(variable, value):  # TensorFlow refusing one variable's value
        if variable is last:
            raise ValueError("not today")
        real_assign(variable, value)

    monkeypatch.setattr(keras_h5, "_assign", refuse)
    with pytest.raises(candle_ckpt.CheckpointFormatError) as refused:
        candle_ckpt.restart(params, model, verbose=False)
    count = len(model.variables) + len(model.optimizer.variables)
    assert (
        f"variable '{last.path}' passed every check, then failed to load (ValueError: not "
        f"today); loaded before it: {count - 1} of {count} variables" in str(refused.value)
    )
