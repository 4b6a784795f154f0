"""A Keras job for the mid-epoch tests: CANDLE's pattern, optionally killed or signalled.

    python tests/keras_steps_job.py --ckpt_directory DIR --epochs 3 --out RUN.json
        [--data arrays|pydataset|tfdata] [--shuffle] [--kill_at E:B] [--pause_at E:B] [flags]

Trains a small MLP with Dropout (seeded, deterministic kernels) through
`CandleCkptKeras` (`J = ckpt.restart(model)`, `fit(initial_epoch=J["epoch"])`) on
NumPy arrays, a `keras.utils.PyDataset` of the same batches or a `tf.data.Dataset` of
them, with fit's `shuffle` (the dataset's own with `reshuffle_each_iteration=False`).
`--kill_at`, `--pause_at` and `--virtual_clock S` are tests/keras_job.py's (kill -9,
or wait for a signal, after batch B of 1-based epoch E; S more seconds on the wall-time
stop's clock per batch). Every epoch's logs are appended to RUN.json's
sibling RUN.epochs.jsonl as they end, so a killed run leaves those it completed;
a run that ends writes RUN.json: `J` as restart returned it, the batches this process
trained (the optimizer's iteration count, before and after fit) and its final weights
and optimizer variables in RUN.npz. Every other flag is a `--ckpt_*` flag.
"""

import argparse
import json
import os
import sys

import numpy as np
from keras_job import (
    at_batch,
    at_every_batch,
    install_virtual_clock,
    kill_myself,
    take_point,
    take_value,
    wait_for_a_signal,
)

BATCH_SIZE, SAMPLES, FEATURES = 16, 160, 8  # 10 batches per epoch


def parse(argv):
    import candle_ckpt

    argv, kill_at = take_point(argv, "--kill_at")
    argv, pause_at = take_point(argv, "--pause_at")
    argv, tick = take_value(argv, "--virtual_clock")
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", choices=("arrays", "pydataset", "tfdata"), default="arrays")
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument(
        "--compile_after_restart", action="store_true", help="NT3's order: restart, then compile"
    )
    candle_ckpt.ckpt_parser(parser)
    parser.set_defaults(ckpt_save_best_metric="loss")
    return vars(parser.parse_args(argv)), kill_at, pause_at, tick


def main(argv):
    params, kill_at, pause_at, tick = parse(argv)
    import candle_ckpt

    tf, keras = candle_ckpt.import_tensorflow_quietly()
    keras.utils.set_random_seed(11)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((SAMPLES, FEATURES)).astype("float32")
    y = (np.sin(x).sum(axis=1, keepdims=True) + 0.1).astype("float32")
    model = build_model(keras, compiled=not params["compile_after_restart"])

    ckpt = candle_ckpt.CandleCkptKeras(params, verbose=False)
    ckpt.set_model(model)
    J = ckpt.restart(model)
    if params["compile_after_restart"]:
        compile_model(keras, model)
    logger = epoch_logger(params["out"])
    callbacks = [ckpt, logger]
    if kill_at:
        callbacks.append(at_batch(kill_at, kill_myself))
    if pause_at:
        callbacks.append(at_batch(pause_at, wait_for_a_signal))
    if tick is not None:
        callbacks.append(at_every_batch(install_virtual_clock(tick)))
    data = {"x": x, "y": y, "batch_size": BATCH_SIZE}
    if params["data"] == "pydataset":
        data = {"x": Batches(keras, x, y)}
    if params["data"] == "tfdata":
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
        if params["shuffle"]:
            dataset = dataset.shuffle(SAMPLES, seed=5, reshuffle_each_iteration=False)
        data = {"x": dataset.batch(BATCH_SIZE)}
    model.fit(
        **data,
        epochs=params["epochs"],
        initial_epoch=J["epoch"] if J else 0,
        shuffle=params["shuffle"],
        verbose=0,
        callbacks=callbacks,
    )
    state = {
        f"{group}/{i}": v.numpy()
        for group, variables in (
            ("weights", model.weights),
            ("optimizer", model.optimizer.variables),
        )
        for i, v in enumerate(variables)
    }
    np.savez(params["out"][: -len(".json")] + ".npz", **state)
    with open(params["out"], "w") as stream:
        json.dump(
            {
                "J": J,
                "trained": int(model.optimizer.iterations.numpy()) - logger.iterations_at_start,
            },
            stream,
        )


def build_model(keras, compiled=True):
    """The job's model, compiled unless told (seed first)."""
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(1),
        ]
    )
    if compiled:
        compile_model(keras, model)
    return model


def compile_model(keras, model):
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])


def epoch_logger(out):
    """A callback appending {"epoch": 1-based, **logs} to OUT's .epochs.jsonl, which
    notes the optimizer's iteration count as fit starts (after candle_ckpt's callback
    loaded a deferred checkpoint) in `iterations_at_start`."""
    import keras

    path = out[: -len(".json")] + ".epochs.jsonl"

    class EpochLogs(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.iterations_at_start = int(self.model.optimizer.iterations.numpy())

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            with open(path, "a") as stream:
                stream.write(json.dumps(row) + "\n")

    return EpochLogs()


def Batches(keras, x, y):
    """The arrays' batches as a keras.utils.PyDataset (what `fit(x, y)` would cut)."""

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return -(-len(x) // BATCH_SIZE)

        def __getitem__(self, index):
            rows = slice(index * BATCH_SIZE, (index + 1) * BATCH_SIZE)
            return x[rows], y[rows]

    return Batches()


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main(sys.argv[1:])
