"""A Keras benchmark in the call order of ECP-CANDLE/Benchmarks' NT3, switched to
candle_ckpt by its import: `CandleCkptKeras`, `set_model`, `restart(model)` before
`model.compile`, `initial_epoch = J["epoch"]`, the callback in fit, `report_final`.

    python tests/candle_lib_job.py OUTPUT_DIR EPOCHS [--kill_at E:B] [--upstream N]

The tree is candle_lib's default, `<OUTPUT_DIR>/ckpts` (`ckpt_directory` None). A
Dropout layer with a seed makes the run depend on the RNG state as well.
`--upstream N` instead trains N epochs with candle_lib's own writer
(tests/candle_lib_tree.py): the tree a job switched after N epochs finds.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from keras_job import at_batch, kill_myself, take_point  # noqa: E402


def candle_lib_params(output_dir, epochs):
    """gParameters as candle_lib's parser gives them (its defaults, explicit)."""
    return {
        "output_dir": output_dir,
        "epochs": epochs,
        "ckpt_restart_mode": "auto",
        "ckpt_checksum": False,
        "ckpt_skip_epochs": 0,
        "ckpt_directory": None,
        "ckpt_save_best": True,
        "ckpt_save_best_metric": "val_loss",
        "ckpt_save_weights_only": False,
        "ckpt_save_interval": 1,
        "ckpt_keep_mode": None,
        "ckpt_keep_limit": 5,
    }


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    return x, y


def build(dropout=True):
    """The model; `dropout=False` for one whose training draws no random numbers
    (candle_lib's files hold no RNG state, so only such a run continues one exactly)."""
    import keras

    keras.utils.set_random_seed(1)
    # named: the file's names then do not depend on how many models this process built
    layers = [keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="hidden")]
    layers += [keras.layers.Dropout(0.2, seed=3, name="dropout")] if dropout else []
    return keras.Sequential([*layers, keras.layers.Dense(1, name="head")], name="nt3")


def compile_model(model):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")


FIT = {"batch_size": 16, "shuffle": False, "verbose": 0}


def upstream(params, epochs, dropout=True):
    """Train `epochs` epochs writing the tree as candle_lib does."""
    from candle_lib_tree import keras_upstream_callback

    x, y = data()
    model = build(dropout)
    compile_model(model)
    model.fit(
        x,
        y,
        epochs=epochs,
        validation_data=(x[:32], y[:32]),
        callbacks=[keras_upstream_callback(params)],
        **FIT,
    )


def nt3(params, callbacks=(), dropout=True):
    import candle_ckpt

    x, y = data()
    model = build(dropout)
    initial_epoch = 0
    ckpt = candle_ckpt.CandleCkptKeras(params, verbose=False)
    ckpt.set_model(model)
    J = ckpt.restart(model)
    if J is not None:
        initial_epoch = J["epoch"]
    compile_model(model)
    model.fit(
        x,
        y,
        epochs=params["epochs"],
        initial_epoch=initial_epoch,
        validation_data=(x[:32], y[:32]),
        callbacks=[*callbacks, ckpt],
        **FIT,
    )
    ckpt.report_final()
    return model


def main(argv):
    argv, kill_at = take_point(argv, "--kill_at")
    argv, upstream_epochs = take_point(argv, "--upstream")
    params = candle_lib_params(argv[0], int(argv[1]))
    if upstream_epochs:
        upstream(params, upstream_epochs[0])
    else:
        nt3(params, [at_batch(kill_at, kill_myself)] if kill_at else [])


if __name__ == "__main__":
    main(sys.argv[1:])
