"""model.h5 round trips: a restored model continues training bit for bit like the original.

Tiny models, trained a few deterministic steps; every "fresh" model is built after the
original in the same process, so it starts from other initial weights and other Dropout
seeds, and only an exact restore can make it equal.
"""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import check_written

keras = pytest.importorskip("keras")
import h5py  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

from candle_ckpt.core.errors import CheckpointFormatError  # noqa: E402
from candle_ckpt.hdf5_check import StoredArray  # noqa: E402
from candle_ckpt.keras import h5 as keras_h5  # noqa: E402

tf.config.experimental.enable_op_determinism()

_DATA = np.random.default_rng(0)
X = _DATA.normal(size=(16, 4)).astype("float32")
Y = (X[:, :1] * 2.0 - X[:, 1:2]).astype("float32")


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)


def dense_adam(hidden=8):
    model = keras.Sequential(
        [keras.Input((4,)), layers.Dense(hidden, activation="relu"), layers.Dense(1)]
    )
    # "mse" would make load_model(h5) fail to deserialise the loss (MEASUREMENTS.md).
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
    return model


def bn_dropout_sgd_momentum():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(8),
            layers.BatchNormalization(),
            layers.Dropout(0.5),
            layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mean_squared_error")
    return model


def nested_model():
    inner = keras.Sequential(
        [keras.Input((6,)), layers.Dense(6), layers.BatchNormalization(), layers.Dropout(0.2)]
    )
    inputs = keras.Input((4,))
    outputs = layers.Dense(1)(inner(layers.Dense(6)(inputs)))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
    return model


def trained(build, steps=3):
    model = build()
    for _ in range(steps):
        model.train_on_batch(X, Y)
    return model


def state(model):
    """Every value restore() promises: weights, SeedGenerator states, optimizer variables."""
    return [v.numpy() for v in model.variables + model.optimizer.variables]


def assert_bit_equal(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"value #{i} differs"


def save(model, tmp_path, **kwargs):
    path = tmp_path / keras_h5.MODEL_FILE
    keras_h5.write(keras_h5.snapshot(model, **kwargs), path)
    return path


@pytest.mark.parametrize("build", [dense_adam, bn_dropout_sgd_momentum, nested_model])
def test_restored_model_continues_bit_for_bit(build, tmp_path):
    original = trained(build)
    path = save(original, tmp_path)
    fresh = build()
    fresh.optimizer.build(fresh.trainable_variables)
    assert not all(np.array_equal(x, y) for x, y in zip(state(original), state(fresh)))

    info = keras_h5.restore(fresh, path)

    assert info == {
        "optimizer_restored": True,
        "rng_restored": True,
        "legacy": False,
        "nbytes": sum(v.nbytes for v in state(original)),
    }
    assert_bit_equal(state(original), state(fresh))
    for model in (original, fresh):
        model.train_on_batch(X, Y)
    assert_bit_equal(state(original), state(fresh))
    for model in (original, fresh):
        model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert_bit_equal(state(original), state(fresh))


def test_large_variables_take_the_verified_read_buffer_and_training_goes_on(tmp_path):
    from candle_ckpt.core.storage.checksum import read_file

    def wide():
        return dense_adam(hidden=8192)  # a 128 KiB kernel: laid out for pwrite, aligned

    original = trained(wide)
    path = save(original, tmp_path)
    contents, _ = read_file(str(path))
    fresh = wide()
    fresh.optimizer.build(fresh.trainable_variables)
    keras_h5.restore(fresh, path, contents=contents)
    start = np.frombuffer(contents, np.uint8, 1).ctypes.data
    buffer = np.asarray(tf.convert_to_tensor(fresh.layers[0].kernel)).ctypes.data
    assert start <= buffer < start + contents.nbytes  # no copy was made
    assert_bit_equal(state(original), state(fresh))
    for _ in range(2):
        for model in (original, fresh):
            model.train_on_batch(X, Y)
    assert_bit_equal(state(original), state(fresh))


def test_plain_keras_load_weights_reads_the_file(tmp_path):
    original = trained(bn_dropout_sgd_momentum)
    path = save(original, tmp_path)
    fresh = bn_dropout_sgd_momentum()
    fresh.load_weights(path)
    assert_bit_equal(original.get_weights(), fresh.get_weights())


def test_keras_load_model_rebuilds_the_model(tmp_path):
    original = trained(nested_model)
    path = save(original, tmp_path)
    loaded = keras.models.load_model(path, compile=False)
    assert_bit_equal(original.get_weights(), loaded.get_weights())
    assert np.array_equal(original.predict(X, verbose=0), loaded.predict(X, verbose=0))


def test_file_layout_is_keras_legacy_h5_plus_our_groups(tmp_path):
    original = trained(bn_dropout_sgd_momentum)
    path = save(original, tmp_path)
    with h5py.File(path, "r") as f:
        assert f.attrs[keras_h5.FORMAT_ATTR] == keras_h5.FORMAT_VERSION
        assert not f.attrs[keras_h5.WEIGHTS_ONLY_ATTR]
        assert "model_config" in f.attrs and "training_config" not in f.attrs
        names = [n.decode() for n in f["optimizer_weights"].attrs["weight_names"]]
        assert names == [v.path for v in original.optimizer.variables]
        assert [n.split("/")[-1] for n in names[:2]] == ["iteration", "learning_rate"]
        assert f["optimizer_weights"][names[0]][()] == 3
        assert len(f[keras_h5.RNG_GROUP].attrs["weight_names"]) == 1
        dataset = f["optimizer_weights"][names[2]]
        assert dataset.chunks is None and dataset.compression is None


def test_weights_only_file_leaves_the_optimizer_fresh(tmp_path):
    original = trained(dense_adam)
    path = save(original, tmp_path, weights_only=True)
    fresh = dense_adam()
    info = keras_h5.restore(fresh, path)
    assert info["optimizer_restored"] is False and info["legacy"] is False
    assert_bit_equal(original.get_weights(), fresh.get_weights())
    assert not fresh.optimizer.built
    with h5py.File(path, "r") as f:
        assert "optimizer_weights" not in f and f.attrs[keras_h5.WEIGHTS_ONLY_ATTR]


def test_snapshot_before_the_first_step_restores(tmp_path):
    path = save(dense_adam(), tmp_path)
    fresh = dense_adam()
    assert keras_h5.restore(fresh, path)["optimizer_restored"]
    assert int(fresh.optimizer.iterations.numpy()) == 0


def test_upstream_file_from_keras3_model_save_restores_exactly(tmp_path):
    original = trained(dense_adam)
    path = str(tmp_path / "upstream.h5")
    original.save(path)
    fresh = dense_adam()
    info = keras_h5.restore(fresh, path)
    assert info["legacy"] and info["optimizer_restored"] and not info["rng_restored"]
    assert_bit_equal(state(original), state(fresh))
    for model in (original, fresh):
        model.train_on_batch(X, Y)
    assert_bit_equal(state(original), state(fresh))


def write_keras2_file(model, path):
    """What tf.keras 2.x model.save wrote: names with ':0', Adam as iter, all m, all v."""
    kernel, bias, kernel_1, bias_1 = model.get_weights()
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.10.0"
        f.attrs["backend"] = "tensorflow"
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = [b"dense", b"dense_1"]
        for layer, values in (("dense", (kernel, bias)), ("dense_1", (kernel_1, bias_1))):
            names = [f"{layer}/kernel:0", f"{layer}/bias:0"]
            weights.create_group(layer).attrs["weight_names"] = [n.encode() for n in names]
            for name, value in zip(names, values):
                weights[layer].create_dataset(name, data=value)
        slots = {"Adam/iter:0": np.int64(3)}
        for slot in "mv":
            for layer in ("dense", "dense_1"):
                for weight, value in (("kernel", kernel), ("bias", bias)):
                    slots[f"Adam/{layer}/{weight}/{slot}:0"] = np.zeros_like(value)
        optimizer = f.create_group("optimizer_weights")
        optimizer.attrs["weight_names"] = [n.encode() for n in slots]
        for name, value in slots.items():
            optimizer.create_dataset(name, data=value)


def test_upstream_keras2_file_restores_weights_and_warns(tmp_path, caplog):
    original = trained(dense_adam)
    path = tmp_path / "keras2.h5"
    write_keras2_file(original, path)
    fresh = dense_adam()
    with caplog.at_level(logging.WARNING):
        info = keras_h5.restore(fresh, path, logger=logging.getLogger("test.restart"))
    assert info == {
        "optimizer_restored": False,
        "rng_restored": False,
        "legacy": True,
        "nbytes": sum(w.nbytes for w in original.get_weights()),
    }
    assert_bit_equal(original.get_weights(), fresh.get_weights())
    assert "optimizer state was not restored" in caplog.text and "2.10.0" in caplog.text


def test_mismatched_layer_raises_and_leaves_the_model_untouched(tmp_path):
    path = save(trained(dense_adam), tmp_path)
    other = dense_adam(hidden=9)
    before = [w.copy() for w in other.get_weights()]
    with pytest.raises(CheckpointFormatError) as e:
        keras_h5.restore(other, path)
    message = str(e.value)
    assert str(path) in message and other.layers[0].name in message
    assert "(4, 8)" in message and "(4, 9)" in message
    assert_bit_equal(before, other.get_weights())
    assert not other.optimizer.built


def test_other_optimizer_raises_and_leaves_the_model_untouched(tmp_path):
    path = save(trained(dense_adam), tmp_path)
    other = dense_adam()
    other.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mean_squared_error")
    before = state(other)
    with pytest.raises(CheckpointFormatError, match="optimizer 'sgd"):
        keras_h5.restore(other, path)
    after = state(other)
    assert_bit_equal(before, after[: len(before)])
    assert all(not np.any(v) for v in after[len(before) :])


def all_arrays(snap):
    return [a for g in snap.layers + (snap.top_level, snap.rng, snap.optimizer) for a in g.arrays]


def check_snapshot_survives_training(build, copy, jit_compile):
    """Snapshot a trained model, train on, and check the snapshot did not move."""
    model = trained(build)
    model.compile(optimizer=model.optimizer, loss="mean_squared_error", jit_compile=jit_compile)
    snap = keras_h5.snapshot(model, copy=copy)
    arrays = all_arrays(snap)
    assert len(arrays) == len(model.variables + model.optimizer.variables)
    values = [a.copy() for a in arrays]
    before = state(model)
    model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert model.jit_compile == jit_compile  # Keras falls back to eager silently
    assert not any(np.array_equal(x, y) for x, y in zip(before, state(model)) if x.size > 1)
    assert_bit_equal(values, arrays)
    assert not any(a.flags.writeable for a in arrays)
    # copies live in the snapshot's own block of memory; views own nothing
    assert all(keras_h5._in_snapshot_block(a) for a in arrays) == copy
    assert not any(a.flags.owndata for a in arrays)
    assert snap.nbytes == sum(v.nbytes for v in values)


@pytest.mark.parametrize("copy", [True, False], ids=["copies", "views"])
def test_training_after_a_snapshot_leaves_it_unchanged(copy):
    check_snapshot_survives_training(bn_dropout_sgd_momentum, copy, jit_compile=False)


def test_training_with_xla_after_a_snapshot_leaves_its_views_unchanged():
    # In a process of its own: this module enables op determinism, which disables XLA.
    code = (
        "import test_keras_h5 as t\n"
        "from tensorflow.python.framework import config\n"
        "config.disable_op_determinism()\n"
        "t.check_snapshot_survives_training(t.dense_adam, copy=False, jit_compile=True)\n"
        "print('unchanged')"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "unchanged", done.stderr[-3000:]


def test_a_copy_into_an_earlier_snapshot_reuses_its_memory():
    model = trained(bn_dropout_sgd_momentum)
    first = keras_h5.snapshot(model)
    first_arrays = all_arrays(first)
    model.train_on_batch(X, Y)
    second = keras_h5.snapshot(model, into=first)
    assert all(a is b for a, b in zip(all_arrays(second), first_arrays))
    assert_bit_equal(all_arrays(keras_h5.snapshot(model)), all_arrays(second))
    assert not any(a.flags.writeable for a in all_arrays(second))


def test_views_and_other_models_snapshots_are_never_overwritten():
    model = trained(bn_dropout_sgd_momentum)
    views = keras_h5.snapshot(model, copy=False)
    copied = all_arrays(keras_h5.snapshot(model, into=views))
    assert not any(a is b for a, b in zip(copied, all_arrays(views)))
    other = keras_h5.snapshot(trained(dense_adam))
    values = [a.copy() for a in all_arrays(other)]
    keras_h5.snapshot(model, into=other)
    assert_bit_equal(values, all_arrays(other))


def test_truncated_file_raises_format_error(tmp_path):
    path = save(trained(dense_adam), tmp_path)
    path.write_bytes(path.read_bytes()[:2000])
    fresh = dense_adam()
    before = fresh.get_weights()
    with pytest.raises(CheckpointFormatError, match="model.h5"):
        keras_h5.restore(fresh, path)
    assert_bit_equal(before, fresh.get_weights())


def test_a_runtime_error_outside_h5py_is_not_called_an_unreadable_file(tmp_path, monkeypatch):
    path = save(trained(dense_adam), tmp_path)

    def failing_plan(*args):
        raise RuntimeError("a layer refused its weights")

    monkeypatch.setattr(keras_h5, "_plan_weights", failing_plan)
    with pytest.raises(RuntimeError, match="a layer refused its weights") as raised:
        keras_h5.restore(dense_adam(), path)
    assert not isinstance(raised.value, CheckpointFormatError)


def test_a_numpy_error_reading_the_file_names_the_file_and_keeps_its_cause(tmp_path, monkeypatch):
    path = save(trained(dense_adam), tmp_path)
    real_format_version = keras_h5._format_version

    def numpy_fails(f, where):
        np.reshape(np.arange(3), (2,))  # numpy raises ValueError from its own Python code
        return real_format_version(f, where)

    monkeypatch.setattr(keras_h5, "_format_version", numpy_fails)
    with pytest.raises(
        CheckpointFormatError, match=r"model.h5' is not a readable HDF5 file \(ValueError: "
    ) as raised:
        keras_h5.restore(dense_adam(), path)
    assert isinstance(raised.value.__cause__, ValueError)


def test_restore_loads_the_bytes_it_is_given_without_opening_the_file(tmp_path):
    original = trained(dense_adam)
    path = save(original, tmp_path)
    contents = memoryview(path.read_bytes())
    path.unlink()
    fresh = dense_adam()
    keras_h5.restore(fresh, path, contents=contents)
    assert_bit_equal(state(original), state(fresh))


def test_chunked_and_compressed_datasets_are_refused_before_they_are_read(tmp_path):
    """candle_ckpt and Keras write contiguous datasets: a filter could inflate a few
    kilobytes into gigabytes, so a reader refuses them (docs/FORMAT.md)."""
    original = trained(bn_dropout_sgd_momentum)
    path = save(original, tmp_path)
    with h5py.File(path, "r+") as f:
        datasets = []
        f.visititems(
            lambda name, node: (
                datasets.append(name) if isinstance(node, h5py.Dataset) and node.size > 1 else None
            )
        )
        for name in datasets:
            values = f[name][()]
            del f[name]
            f.create_dataset(name, data=values, compression="gzip", chunks=True)
        assert all(f[name].chunks for name in datasets)
    fresh = bn_dropout_sgd_momentum()
    before = state(fresh)
    with pytest.raises(CheckpointFormatError, match="is chunked .candle_ckpt writes contiguous"):
        keras_h5.restore(fresh, path)
    assert_bit_equal(before, state(fresh))


def test_a_dataset_recorded_past_the_end_of_the_file_is_refused():
    # what a damaged address in an object header would give
    stored = StoredArray("/model_weights/dense/kernel", 100, (4,), np.dtype("float32"), {})
    with pytest.raises(
        CheckpointFormatError,
        match=r"'f.h5': dataset '/model_weights/dense/kernel' \(16 bytes at "
        r"offset 100\) extends past the end of the file \(110 bytes\)",
    ):
        stored.array(memoryview(bytes(110)), "f.h5")


def test_long_name_lists_are_split_as_keras_splits_them(tmp_path):
    from keras.src.legacy.saving.legacy_h5_format import load_attributes_from_hdf5_group

    names = [f"model/block_{i}/a_rather_long_layer_name/kernel" for i in range(3000)]
    with h5py.File(tmp_path / "names.h5", "w") as f:
        keras_h5._write_names(f, "weight_names", names)
        assert "weight_names" not in f.attrs and "weight_names1" in f.attrs
        assert keras_h5._read_names(f, "weight_names") == names
        assert load_attributes_from_hdf5_group(f, "weight_names") == names


class _EmptyWeight(layers.Layer):
    """A layer holding a zero-size weight next to a normal one."""

    def build(self, input_shape):
        self.nothing = self.add_weight(
            shape=(0, 3), initializer="zeros", name="nothing", trainable=False
        )
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, inputs):
        return inputs * self.scale


def odd_sized_model():
    """A kernel whose bytes end mid-block (37 x 1001 float32: 148148 bytes), a zero-size
    weight, many small layers below the alignment threshold, Adam's slots for all."""
    x = inputs = keras.Input((37,))
    x = _EmptyWeight()(layers.Dense(1001)(x))
    for _ in range(40):
        x = layers.Dense(3)(x)
    model = keras.Model(inputs, x)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
    rows = np.random.default_rng(1).normal(size=(8, 37)).astype("float32")
    model.train_on_batch(rows, np.zeros((8, 3), "float32"))
    return model


@pytest.mark.parametrize("copy", [True, False])
def test_the_crc_from_memory_is_the_files(tmp_path, copy, o_direct):
    """The CRC32 `write` computes from memory and the layout read back equals zlib's over
    the file's bytes, for a snapshot (O_DIRECT from its own memory) and for views of the
    variables (through the bounce buffer)."""

    model = odd_sized_model()
    snap = keras_h5.snapshot(model, copy=copy)
    large = [a for a in all_arrays(snap) if a.nbytes >= 64 << 10]
    assert len(large) == 3  # the kernel and its two Adam slots
    if copy:
        assert all(a.ctypes.data % 4096 == 0 for a in large)
    path = str(tmp_path / keras_h5.MODEL_FILE)
    check_written(keras_h5.write(snap, path), path, large, o_direct)
    fresh = odd_sized_model()
    keras_h5.restore(fresh, path)
    assert_bit_equal(state(fresh), state(model))
