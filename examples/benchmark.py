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
"""

import argparse
import ast
import configparser
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model.txt")


def read_config(path):
    """The [Global_Params] section of a CANDLE parameter file, values as Python literals."""
    parser = configparser.ConfigParser()
    if not parser.read(path):
        raise FileNotFoundError(f"parameter file '{path}' not found")
    return {key: ast.literal_eval(value) for key, value in parser["Global_Params"].items()}


def initialize_parameters(argv=None):
    """gParameters: defaults < parameter file < command line, as in CANDLE."""
    import candle_ckpt

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file", default=DEFAULT_CONFIG)
    config_file = pre.parse_known_args(argv)[0].config_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[pre])
    parser.add_argument("--epochs", type=int, help="train up to this (1-based) epoch")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--n_samples", type=int, help="number of generated training samples")
    parser.add_argument("--n_features", type=int)
    parser.add_argument("--dense", type=ast.literal_eval, help="hidden layer sizes, e.g. [512,256]")
    parser.add_argument("--dropout", type=float)
    parser.add_argument("--seed", type=int)
    candle_ckpt.ckpt_parser(parser)
    parser.set_defaults(**read_config(config_file))
    return vars(parser.parse_args(argv))


def make_data(params):
    """A deterministic regression problem: y = a smooth nonlinear function of x + noise."""
    import numpy as np

    rng = np.random.default_rng(params["seed"])
    n, d = params["n_samples"], params["n_features"]
    x = rng.standard_normal((n + n // 4, d)).astype("float32")
    w = rng.standard_normal((d, 1)).astype("float32") / np.sqrt(d)
    y = (np.sin(x @ w) + 0.1 * rng.standard_normal((len(x), 1))).astype("float32")
    return (x[:n], y[:n]), (x[n:], y[n:])


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
    model.compile(optimizer=keras.optimizers.Adam(params["learning_rate"]),
                  loss="mean_squared_error", metrics=["mean_absolute_error"])
    return model


def run(params, callbacks=()):
    """Restart if there is a checkpoint, train to params["epochs"], return the history."""
    import keras
    import tensorflow as tf

    import candle_ckpt

    keras.utils.set_random_seed(params["seed"])
    tf.config.experimental.enable_op_determinism()
    (x, y), validation = make_data(params)
    model = build_model(params)
    J = candle_ckpt.restart(params, model)
    initial_epoch = J["epoch"] if J else 0
    if initial_epoch >= params["epochs"]:
        print(f"checkpoint is at epoch {initial_epoch}, --epochs is {params['epochs']}: "
              f"nothing more to train")
    ckpt = candle_ckpt.CandleCheckpointCallback(params)
    history = model.fit(x, y, batch_size=params["batch_size"], epochs=params["epochs"],
                        initial_epoch=initial_epoch, validation_data=validation,
                        shuffle=False, callbacks=[ckpt, *callbacks], verbose=2)
    return model, history


def main(argv=None):
    params = initialize_parameters(argv)
    _, history = run(params)
    if history.history:
        print(f"final val_loss {history.history['val_loss'][-1]:.6f} after epoch "
              f"{history.epoch[-1] + 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
