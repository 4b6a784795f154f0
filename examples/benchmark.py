"""A CANDLE-style benchmark with checkpoint/restart: the README's main job.

Trains a small multilayer perceptron on a regression problem whose data the script
generates deterministically (no downloads). Parameters come from `default_model.txt`
(CANDLE's INI format, `[Global_Params]`), overridden by command-line flags, including
every `--ckpt_*` flag of candle_ckpt.

Run it, kill it (Ctrl-C, `kill -9`, a batch-system time limit) and run it again: it
resumes from `save/ckpts/last`. Run it twice with the same `--epochs`: the second run
restarts at the end and trains nothing more.

    python examples/benchmark.py                     # 8 epochs into ./save
    python examples/benchmark.py --epochs 12         # 4 more epochs
    python examples/benchmark.py --ckpt_restart_mode off --ckpt_directory /tmp/fresh

Ctrl-C saves and stops: `default_model.txt` sets `ckpt_signal = 'INT'`, so the first
Ctrl-C stops training at the end of the running batch, makes sure the last completed
epoch is on disk and exits with status 75 (`--ckpt_signal off`: Python's
KeyboardInterrupt instead).

Exit status: 0 done; 75 stopped by ckpt_signal (rerun it to continue); and, after one
line on stderr naming the problem and its remedy, 2 a bad parameter, 3 the checkpoint
to restart from is unusable, 4 another job writes the checkpoint tree, 5 a save failed
(`candle_ckpt.core.errors.exit_status`).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # candle_params.py sits beside this script
import candle_params  # noqa: E402

DEFAULT_CONFIG = os.path.join(HERE, "default_model.txt")
make_data = candle_params.regression_data


def initialize_parameters(argv=None):
    """gParameters: defaults < parameter file (--config_file) < command line."""
    return candle_params.initialize_parameters(
        __doc__.splitlines()[0],
        DEFAULT_CONFIG,
        argv=argv,
        optimizer="Adam",
        seeded="the data, the weights and Dropout",
    )


def build_model(params):
    """A compiled MLP; built deterministically from the seed."""
    import keras

    inputs = keras.Input(shape=(params["n_features"],))
    hidden = inputs
    for width in params["dense"]:
        hidden = keras.layers.Dense(width, activation="relu")(hidden)
        hidden = keras.layers.Dropout(params["dropout"], seed=params["seed"])(hidden)
    outputs = keras.layers.Dense(1)(hidden)
    model = keras.Model(inputs, outputs, name="benchmark_mlp")
    model.compile(
        optimizer=keras.optimizers.Adam(params["learning_rate"]),
        loss="mean_squared_error",
        metrics=["mean_absolute_error"],
    )
    return model


def run(params, callbacks=()):
    """Restart if there is a checkpoint, train to params["epochs"], return the history."""
    import candle_ckpt

    tf, keras = candle_ckpt.import_tensorflow_quietly()
    keras.utils.set_random_seed(params["seed"])
    tf.config.experimental.enable_op_determinism()
    (x, y), validation = make_data(params)
    model = build_model(params)
    J = candle_ckpt.restart(params, model)
    initial_epoch = J["epoch"] if J else 0
    if initial_epoch >= params["epochs"]:
        print(
            f"checkpoint is at epoch {initial_epoch}, --epochs is {params['epochs']}: "
            f"nothing more to train"
        )
    ckpt = candle_ckpt.CandleCheckpointCallback(params)
    history = model.fit(
        x,
        y,
        batch_size=params["batch_size"],
        epochs=params["epochs"],
        initial_epoch=initial_epoch,
        validation_data=validation,
        shuffle=False,
        callbacks=[ckpt, *callbacks],
        verbose=2,
    )
    return model, history


def main(argv=None):
    import candle_ckpt

    params = initialize_parameters(argv)
    try:
        _, history = run(params)
    except candle_ckpt.CheckpointError as error:
        return candle_params.report_refusal(__file__, error)
    if history.history:
        print(
            f"final val_loss {history.history['val_loss'][-1]:.6f} after epoch "
            f"{history.epoch[-1] + 1}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
