"""What resuming `model.fit` mid-epoch costs: the skipped batches are read, not trained.

A fit resumed at batch B of an epoch (a step checkpoint, `candle_ckpt.keras.steps`)
restores the metrics, moves fit's data iterator past the B batches already trained
(tf.data produces them: there is no skipping without producing) and short-circuits
fit's first B steps. This measures a fit resumed at the epoch's last batch (B = all
but one: the most to skip) against a whole epoch trained, alternately in one process,
on NumPy arrays and on a `keras.utils.PyDataset` of the same batches:

    .venv/bin/python benchmarks/bench_keras_resume.py [--samples 200000] \
        [--features 256] [--batch 100] [--repeats 3]

Each line: the data, the mean seconds of each fit over the repeats, and their ratio.
The model is a small MLP, so a trained batch costs little more than reading it: with
a larger model the ratio only falls.
"""

import argparse
import os
import random
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

import candle_ckpt
from candle_ckpt.keras import steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, keras = candle_ckpt.import_tensorflow_quietly()
    x = np.random.default_rng(0).standard_normal((args.samples, args.features), "float32")
    y = x[:, :1].copy()
    batches = args.samples // args.batch

    class Batches(keras.utils.PyDataset):
        def __len__(self) -> int:
            return batches

        def __getitem__(self, i: int) -> tuple:
            return x[i * args.batch : (i + 1) * args.batch], y[
                i * args.batch : (i + 1) * args.batch
            ]

    model = keras.Sequential(
        [
            keras.Input((args.features,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile("adam", "mse")
    print(f"{batches} batches of {args.batch} x {args.features} float32 ({x.nbytes / 1e6:.0f} MB)")
    for data in ("arrays", "pydataset"):
        inputs = (
            {"x": Batches()} if data == "pydataset" else {"x": x, "y": y, "batch_size": args.batch}
        )
        resumed, whole = measure(keras, model, inputs, batches, args.repeats)
        print(
            f"{data}: resumed at batch {batches - 1} (skip {batches - 1}, train 1) "
            f"{resumed:.2f} s; a whole epoch trained {whole:.2f} s; ratio "
            f"{resumed / whole:.2f} ({args.repeats} repeats)"
        )


def measure(keras, model, inputs: dict, batches: int, repeats: int) -> tuple[float, float]:
    """Mean seconds of a fit resumed at the last batch, and of a whole epoch."""

    def fit(callbacks: list) -> float:
        started = time.perf_counter()
        model.fit(**inputs, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        return time.perf_counter() - started

    fit([])  # traces the train function and builds the metrics
    variables = model.metrics_variables
    state = steps.StepState(
        0,
        batches - 1,
        batches,
        tuple(v.path for v in variables),
        tuple(np.array(v.numpy()) for v in variables),
        random.getstate(),
    )

    class ResumeAtLastBatch(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            steps.start_at_batch(self.model, state, batches)

    resumed, whole = [], []
    for _ in range(repeats):
        resumed.append(fit([ResumeAtLastBatch()]))
        whole.append(fit([]))
    return float(np.mean(resumed)), float(np.mean(whole))


if __name__ == "__main__":
    main()
