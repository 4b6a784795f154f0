"""Scenarios with real Keras models: kill -9 and resume bit for bit, rollback by hand,
best direction, restart modes, corruption, upstream-CANDLE trees."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from conftest import flip_byte
from keras_helpers import assert_same_state, fit_checkpointed, run_job, tree_summary

import candle_ckpt
from candle_ckpt.core.format.layout import CheckpointLayout

keras = pytest.importorskip("keras")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run A: 6 epochs, never interrupted, every epoch kept."""
    ckpt_dir = tmp_path_factory.mktemp("uninterrupted") / "save"
    run_job(ckpt_dir, "--epochs", "6")
    return ckpt_dir


def final_model(ckpt_dir, epoch=6):
    return os.path.join(ckpt_dir, "ckpts", "epochs", "%03d" % epoch, "model.h5")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_during_epoch_4_resumes_bit_identical(uninterrupted, tmp_path, mode):
    ckpt_dir = tmp_path / "save"
    flags = ("--epochs", "6", "--ckpt_async", str(mode == "async"))
    run_job(ckpt_dir, *flags, "--kill_at", "4:3", expect_killed=True)
    # an async save of epoch 3 may still have been in flight when the kill came
    restart_epoch = int(os.readlink(ckpt_dir / "ckpts" / "last")[-3:])
    assert restart_epoch == 3 or (mode == "async" and restart_epoch == 2)
    resumed = run_job(ckpt_dir, *flags)
    assert f"restarted from epoch {restart_epoch}" in resumed.stderr
    assert_same_state(final_model(uninterrupted), final_model(ckpt_dir))
    assert tree_summary(ckpt_dir) == tree_summary(uninterrupted)
    info_a = json.load(open(os.path.join(uninterrupted, "ckpts/last/ckpt-info.json")))
    info_b = json.load(open(os.path.join(ckpt_dir, "ckpts/last/ckpt-info.json")))
    for key in ("epoch", "epoch_best", "best_metric_last", "metrics", "checksum"):
        assert info_a[key] == info_b[key], key


def test_killed_run_with_a_keep_limit_keeps_the_same_epochs(tmp_path):
    limited = ("--epochs", "6", "--ckpt_keep_limit", "2", "--ckpt_save_best", "false")
    reference, killed = tmp_path / "a", tmp_path / "b"
    run_job(reference, *limited)
    run_job(killed, *limited, "--kill_at", "5:2", expect_killed=True)
    run_job(killed, *limited)
    assert sorted(os.listdir(killed / "ckpts/epochs")) == ["005", "006"]
    assert sorted(os.listdir(reference / "ckpts/epochs")) == ["005", "006"]
    assert_same_state(final_model(reference), final_model(killed))


@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_operator_rolls_back_to_epoch_3_by_hand(uninterrupted, tmp_path, absolute):
    ckpt_dir = tmp_path / "save"
    shutil.copytree(uninterrupted, ckpt_dir, symlinks=True)
    last = ckpt_dir / "ckpts" / "last"
    os.unlink(last)
    os.symlink(str(ckpt_dir / "ckpts/epochs/003") if absolute else "epochs/003", last)
    resumed = run_job(ckpt_dir, "--epochs", "6")
    assert "restarted from epoch 3" in resumed.stderr
    for epoch in (4, 5, 6):
        assert f"replaced existing epoch {epoch}" in resumed.stderr
    # deterministic training: the rewritten timeline equals the original one
    assert_same_state(final_model(uninterrupted), final_model(ckpt_dir))
    assert tree_summary(ckpt_dir) == tree_summary(uninterrupted)


# -- in-process scenarios ---------------------------------------------------------------


def tiny_model(seed=1, loss="mean_squared_error", metrics=()):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss, metrics=list(metrics))
    return model


def data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype("float32")
    return x, (x[:, :1] > 0).astype("float32")


def fit(model, params, epochs, initial_epoch=0):
    x, y = data()
    history, _ = fit_checkpointed(
        model, params, x, y, epochs, initial_epoch, validation_data=data(seed=1)
    )
    return history


def params_for(tmp_path, **extra):
    params = {"ckpt_directory": str(tmp_path / "save"), "epochs": 5}
    params.update(extra)
    return params


@pytest.mark.parametrize("metric,pick", [("val_accuracy", np.argmax), ("val_loss", np.argmin)])
def test_best_follows_the_metric_direction(tmp_path, metric, pick):
    params = params_for(tmp_path, ckpt_save_best_metric=metric)
    model = tiny_model(loss="binary_crossentropy", metrics=["accuracy"])
    history = fit(model, params, 5)
    values = history.history[metric]
    best = int(pick(values)) + 1  # first occurrence, as a strict improvement rule gives
    assert CheckpointLayout(params["ckpt_directory"]).resolve_link("best") == best


def weights(model):
    return [w.copy() for w in model.get_weights()]


def test_restart_modes(tmp_path):
    params = params_for(tmp_path)
    model = tiny_model()
    assert candle_ckpt.restart({**params, "ckpt_restart_mode": "off"}, model) is None
    assert not os.path.exists(params["ckpt_directory"])
    assert candle_ckpt.restart(params, model, verbose=False) is None
    with pytest.raises(candle_ckpt.NoCheckpointError, match=r"ckpts/last' is absent"):
        candle_ckpt.restart({**params, "ckpt_restart_mode": "required"}, model)
    fit(model, params, 2)
    fresh = tiny_model(seed=7)
    info = candle_ckpt.restart({**params, "ckpt_restart_mode": "required"}, fresh, verbose=False)
    assert info["epoch"] == 2
    for a, b in zip(weights(model), weights(fresh)):
        assert np.array_equal(a, b)


def test_bit_flip_in_model_file_is_refused_and_model_untouched(tmp_path):
    params = params_for(tmp_path)
    fit(tiny_model(), params, 2)
    path = os.path.join(params["ckpt_directory"], "ckpts", "last", "model.h5")
    flip_byte(path, offset=os.path.getsize(path) // 2, mask=0x10)
    fresh = tiny_model(seed=7)
    before = weights(fresh)
    with pytest.raises(candle_ckpt.ChecksumMismatchError) as raised:
        candle_ckpt.restart(params, fresh, verbose=False)
    assert "model.h5" in str(raised.value) and "records CRC32" in str(raised.value)
    for a, b in zip(before, weights(fresh)):
        assert np.array_equal(a, b)


def test_restart_loads_the_bytes_it_verified_and_reads_the_file_once(tmp_path, monkeypatch):
    from candle_ckpt.core.restore import restart as restart_flow

    params = params_for(tmp_path)
    model = tiny_model()
    fit(model, params, 2)
    path = os.path.realpath(os.path.join(params["ckpt_directory"], "ckpts", "last", "model.h5"))
    opened = []
    real_open, real_find = open, restart_flow.find_checkpoint

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == path:
            opened.append(args)
        return real_open(file, *args, **kwargs)

    def find_then_damage_the_file(*args):
        found = real_find(*args)
        with real_open(path, "r+b") as stream:  # changed after it was verified
            stream.write(b"\0" * 4096)
        return found

    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr(restart_flow, "find_checkpoint", find_then_damage_the_file)
    fresh = tiny_model(seed=7)
    assert candle_ckpt.restart(params, fresh, verbose=False)["epoch"] == 2
    assert len(opened) == 1
    for a, b in zip(weights(model), weights(fresh)):
        assert np.array_equal(a, b)


def test_weights_only_checkpoint_restores_weights_with_a_warning(tmp_path, caplog):
    params = params_for(tmp_path, ckpt_save_weights_only=True)
    model = tiny_model()
    fit(model, params, 2)
    fresh = tiny_model(seed=7)
    with caplog.at_level(logging.WARNING, logger="candle_ckpt"):
        assert candle_ckpt.restart(params, fresh, verbose=False)["weights_only"] is True
    assert "no optimizer state restored" in caplog.text
    for a, b in zip(weights(model), weights(fresh)):
        assert np.array_equal(a, b)


def test_checkpoint_without_checksums_restarts_with_a_warning(tmp_path, caplog):
    params = params_for(tmp_path, ckpt_checksum=False)
    fit(tiny_model(), params, 1)
    with caplog.at_level(logging.WARNING, logger="candle_ckpt"):
        candle_ckpt.restart({**params, "ckpt_checksum": True}, tiny_model(), verbose=False)
    assert "written without checksums" in caplog.text


def test_upstream_candle_tree_restarts(tmp_path, caplog):
    """Absolute links, the 8-key JSON with Infinity, a plain Keras model.save h5."""
    model = tiny_model()
    x, y = data()
    model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0)
    root = tmp_path / "save"
    epoch_dir = root / "ckpts" / "epochs" / "003"
    epoch_dir.mkdir(parents=True)
    model.save(str(epoch_dir / "model.h5"))
    (epoch_dir / "ckpt-info.json").write_text(
        '{"epoch": 3, "save_best_metric": "val_loss", "best_metric_last": Infinity, '
        '"model_file": "model.h5", "checksum": "__DISABLED__", '
        '"timestamp": "2021-05-03 10:00:00", "time_elapsed": 12.5, "metadata": null}\n'
    )
    for name in ("last", "best"):
        os.symlink(str(epoch_dir), root / "ckpts" / name)
    fresh = tiny_model(seed=7)
    with caplog.at_level(logging.INFO, logger="candle_ckpt"):
        info = candle_ckpt.restart({"ckpt_directory": str(root)}, fresh, verbose=False)
    assert info["epoch"] == 3 and "legacy" in caplog.text
    for a, b in zip(weights(model), weights(fresh)):
        assert np.array_equal(a, b)
    assert int(fresh.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy())
    # and training goes on into the same tree, in the new format, from epoch 4
    fit(fresh, {"ckpt_directory": str(root), "epochs": 4}, 4, initial_epoch=3)
    assert os.readlink(root / "ckpts" / "last") == "epochs/004"


def test_keras_names_load_lazily():
    assert candle_ckpt.CandleCheckpointCallback.__module__ == "candle_ckpt.keras.callback"
    assert issubclass(candle_ckpt.CandleCheckpointCallback, keras.callbacks.Callback)
    assert callable(candle_ckpt.restart)
