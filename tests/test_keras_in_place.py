"""A restart reads a model's large arrays straight into its variables once the file
verifies: same values, same buffers, and a file that fails leaves nothing behind or
says what it overwrote."""

import os

import numpy as np
import pytest
from conftest import change_after_its_crc
from keras_helpers import fit_checkpointed
from test_keras_restart import params_for

import candle_ckpt
from candle_ckpt.core.storage import checksum
from candle_ckpt.keras import h5

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def in_place_from_any_size(monkeypatch):
    """These models are small: read them in place all the same."""
    monkeypatch.setattr(checksum, "IN_PLACE_MIN_BYTES", 0)


def wide_model(seed=1):
    """A model whose kernel and its Adam slots (128 KiB each) are read in place."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(128), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
    model.optimizer.build(model.trainable_variables)
    return model


def batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((16, 256)).astype("float32"), rng.standard_normal((16, 1))


def state(model):
    return [np.array(v.numpy()) for v in model.weights + model.optimizer.variables]


def address(variable):
    return np.from_dlpack(tf.convert_to_tensor(variable)).ctypes.data


@pytest.fixture()
def trained(tmp_path):
    """A tree of epochs 1 and 2 of the wide model, and the model after epoch 2."""
    params = params_for(tmp_path, ckpt_save_best=False)
    model = wide_model()
    x, y = batch()
    fit_checkpointed(model, params, x, y.astype("float32"), 2, 0)
    return params, model


def model_file(params, epoch):
    return os.path.join(params["ckpt_directory"], "ckpts", "epochs", f"{epoch:03d}", "model.h5")


def kernel_offset(params, epoch):
    import h5py

    found = []
    with h5py.File(model_file(params, epoch), "r") as f:
        f["model_weights"].visititems(
            lambda name, obj: (
                found.append(obj.id.get_offset())
                if name.endswith("kernel") and obj.shape == (256, 128)
                else None
            )
        )
    return found[0]


def test_large_arrays_are_read_into_the_variables_own_buffers(trained):
    params, model = trained
    fresh = wide_model(seed=7)
    kernel = fresh.layers[0].kernel
    before = address(kernel)
    assert candle_ckpt.restart(params, fresh, verbose=False)["epoch"] == 2
    assert address(kernel) == before
    for a, b in zip(state(model), state(fresh)):
        assert np.array_equal(a, b)
    x, y = batch(seed=1)
    model.train_on_batch(x, y)
    fresh.train_on_batch(x, y)
    for a, b in zip(state(model), state(fresh)):
        assert np.array_equal(a, b)


def test_a_flip_in_a_large_array_leaves_the_model_untouched(trained):
    params, _ = trained
    path = model_file(params, 2)
    with open(path, "r+b") as stream:
        stream.seek(kernel_offset(params, 2) + 100)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0x10]))
    fresh = wide_model(seed=7)
    before = state(fresh)
    with pytest.raises(candle_ckpt.ChecksumMismatchError) as raised:
        candle_ckpt.restart(params, fresh, verbose=False)
    assert "overwritten" not in str(raised.value)
    for a, b in zip(before, state(fresh)):
        assert np.array_equal(a, b)


@pytest.fixture()
def changed_after_verification(trained, monkeypatch):
    """The newest model file changes between its CRC32 and the read into the model."""
    params, _ = trained
    path, offset = model_file(params, 2), kernel_offset(params, 2)
    change_after_its_crc(monkeypatch, path, offset)
    return params


def test_a_file_that_changes_after_its_crc_is_refused_saying_what_it_overwrote(
    changed_after_verification,
):
    with pytest.raises(candle_ckpt.ChecksumMismatchError, match="values are now partly unverified"):
        candle_ckpt.restart(changed_after_verification, wide_model(seed=7), verbose=False)


def test_fallback_loads_every_variable_the_changed_file_overwrote(changed_after_verification):
    params = {**changed_after_verification, "ckpt_restart_fallback": True}
    fresh, reference = wide_model(seed=7), wide_model(seed=8)
    assert candle_ckpt.restart(params, fresh, verbose=False)["epoch"] == 1
    h5.restore(reference, model_file(params, 1))
    for a, b in zip(state(reference), state(fresh)):
        assert np.array_equal(a, b)


def test_a_file_that_does_not_load_every_overwritten_variable_is_refused(trained):
    params, _ = trained
    model = wide_model(seed=7)
    slot = model.optimizer.variables[-1]
    with pytest.raises(candle_ckpt.CheckpointFormatError, match="does not load every"):
        h5.restore(model, model_file(params, 1), weights_only=True, overwritten={id(slot)})
