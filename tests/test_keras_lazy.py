"""Restart into a subclassed Keras model whose variables only exist after its first call:
the load is deferred to CandleCheckpointCallback and is exact; kill -9 resumes bit for bit."""

import os

import numpy as np
import pytest
from keras_helpers import assert_same_state, fit_checkpointed, run_job, tree_summary

import candle_ckpt
from candle_ckpt.keras import deferred

keras = pytest.importorskip("keras")


def final_model(ckpt_dir, epoch=6):
    return os.path.join(ckpt_dir, "ckpts", "epochs", "%03d" % epoch, "model.h5")


@pytest.fixture(scope="module")
def uninterrupted_lazy(tmp_path_factory):
    """6 epochs of the subclassed model, never interrupted."""
    ckpt_dir = tmp_path_factory.mktemp("uninterrupted_lazy") / "save"
    run_job(ckpt_dir, "--epochs", "6", "--subclassed")
    return ckpt_dir


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_lazily_built_model_killed_during_epoch_4_resumes_bit_identical(
    uninterrupted_lazy, tmp_path, mode
):
    ckpt_dir = tmp_path / "save"
    flags = ("--epochs", "6", "--subclassed", "--ckpt_async", str(mode == "async"))
    run_job(ckpt_dir, *flags, "--kill_at", "4:3", expect_killed=True)
    restart_epoch = int(os.readlink(ckpt_dir / "ckpts" / "last")[-3:])
    assert restart_epoch == 3 or (mode == "async" and restart_epoch == 2)
    resumed = run_job(ckpt_dir, *flags)
    log = open(ckpt_dir / "ckpt.log").read()
    deferral = log.index(f"restart from epoch {restart_epoch}: ")
    loaded = log.index(f"restarted from epoch {restart_epoch}: read and verified ", deferral)
    assert "load deferred: model 'lazy_mlp' has no variables yet" in log[deferral:loaded]
    assert "(weights, optimizer, RNG)" in log[loaded:].splitlines()[0]
    assert "deferred until fit built the model, before its first step" in resumed.stderr
    assert_same_state(final_model(uninterrupted_lazy), final_model(ckpt_dir))
    assert tree_summary(ckpt_dir) == tree_summary(uninterrupted_lazy)


# -- in-process scenarios ---------------------------------------------------------------


class TwoDense(keras.Model):
    """Layers made in __init__, variables made by the first call (no build)."""

    def __init__(self, width=8):
        super().__init__(name="two_dense")
        self.hidden = keras.layers.Dense(width, activation="relu")
        self.head = keras.layers.Dense(1)

    def call(self, x):
        return self.head(self.hidden(x))


def lazy_model(seed=1, width=8):
    keras.utils.set_random_seed(seed)
    model = TwoDense(width)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
    return model


def data(n=64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 4)).astype("float32")
    return x, x[:, :1] * 2.0


def fit(model, params, epochs, initial_epoch=0):
    x, y = data()
    history, _ = fit_checkpointed(model, params, x, y, epochs, initial_epoch)
    return history


def params_for(tmp_path, **extra):
    return {
        "ckpt_directory": str(tmp_path / "save"),
        "epochs": 4,
        "ckpt_save_best_metric": "loss",
        **extra,
    }


def optimizer_state(model):
    return [v.numpy() for v in model.optimizer.variables]


def test_restart_into_an_unbuilt_model_defers_and_fit_resumes_exactly(tmp_path):
    params = params_for(tmp_path)
    reference = lazy_model()
    fit(reference, {**params, "ckpt_directory": str(tmp_path / "uninterrupted")}, 4)
    first_half = lazy_model()
    fit(first_half, params, 2)
    saved_iterations = int(first_half.optimizer.iterations)

    resumed = lazy_model(seed=7)
    info = candle_ckpt.restart(params, resumed, verbose=False)
    assert info["epoch"] == 2
    assert deferred.is_pending(resumed) and not resumed.weights

    iterations_after_first_step = []

    class FirstStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if not iterations_after_first_step:
                iterations_after_first_step.append(int(resumed.optimizer.iterations))

    x, y = data()
    resumed.fit(
        x,
        y,
        epochs=4,
        initial_epoch=2,
        batch_size=16,
        shuffle=False,
        verbose=0,
        callbacks=[candle_ckpt.CandleCheckpointCallback(params, verbose=False), FirstStep()],
    )
    assert not deferred.is_pending(resumed)
    # the optimizer state was loaded before the first update, which then counted on it
    assert iterations_after_first_step == [saved_iterations + 1]
    for a, b in zip(reference.get_weights(), resumed.get_weights()):
        assert np.array_equal(a, b)
    for a, b in zip(optimizer_state(reference), optimizer_state(resumed)):
        assert np.array_equal(a, b)
    log = open(tmp_path / "save" / "ckpt.log").read()
    assert "restart from epoch 2: " in log and "load deferred" in log
    assert "restarted from epoch 2: read and verified " in log
    assert "deferred until fit built the model, before its first step" in log


def test_model_built_by_hand_after_restart_is_loaded_at_the_start_of_fit(tmp_path):
    params = params_for(tmp_path)
    reference = lazy_model()
    fit(reference, params, 2)
    expected = [w.copy() for w in reference.get_weights()]

    resumed = lazy_model(seed=7)
    candle_ckpt.restart(params, resumed, verbose=False)
    resumed(data()[0][:1])
    callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False)
    callback.set_model(resumed)
    callback.on_train_begin()
    try:
        for a, b in zip(expected, resumed.get_weights()):
            assert np.array_equal(a, b)
    finally:
        callback.on_train_end()
    assert "deferred until the start of fit" in open(tmp_path / "save" / "ckpt.log").read()


def test_deferred_load_that_does_not_fit_the_built_model_is_refused_before_a_step(tmp_path):
    params = params_for(tmp_path)
    fit(lazy_model(), params, 2)

    wider = lazy_model(seed=7, width=16)
    assert candle_ckpt.restart(params, wider, verbose=False)["epoch"] == 2
    steps = []

    class CountSteps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps.append(batch)

    x, y = data()
    with pytest.raises(
        candle_ckpt.CheckpointFormatError,
        match=r"shape \(4, 8\) in the "
        r"file, the model's 'two_dense/dense(_\d+)?/kernel' is float32 of "
        r"shape \(4, 16\)",
    ):
        wider.fit(
            x,
            y,
            epochs=4,
            initial_epoch=2,
            batch_size=16,
            verbose=0,
            callbacks=[candle_ckpt.CandleCheckpointCallback(params, verbose=False), CountSteps()],
        )
    assert steps == []
    assert "deferred restart from epoch 2 refused: " in open(tmp_path / "save" / "ckpt.log").read()


def test_data_without_a_spec_is_refused_with_the_build_advice(tmp_path):
    params = params_for(tmp_path)
    fit(lazy_model(), params, 2)
    model = lazy_model(seed=7)
    candle_ckpt.restart(params, model, verbose=False)
    model.train_function = lambda iterator: None  # what fit would have made
    deferred.load_when_built(model)
    with pytest.raises(
        candle_ckpt.CheckpointError,
        match=r"without an element_spec; build the model before calling "
        r"restart\(\): call it on one batch \(model\(x\[:1\]\)\)",
    ):
        model.train_function(iter([]))
    assert not model.weights
