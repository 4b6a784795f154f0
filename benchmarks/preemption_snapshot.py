"""What `ckpt_signal` costs: a host snapshot at every epoch end the interval skips.

With `ckpt_signal` on, the callback copies the training state to host memory at each
epoch end it does not save, so that a pre-emption can still save that epoch. This
prints, for a few state sizes, the median time of that snapshot and of a full save
(snapshot + model.h5 + fsync + CRC32 + ckpt-info.json + rename + links) measured in
the same run, and their ratio::

    PYTHONPATH=. python benchmarks/preemption_snapshot.py [--sizes_mb 31 302] [--repeats 5]
"""

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time


def model_with_state(megabytes):
    """A compiled Dense model whose weights + Adam slots take about `megabytes` MB."""
    import keras
    import numpy as np

    width = int((megabytes * 1e6 / 4 / 3 / 2) ** 0.5)  # two width x width kernels, x3 for Adam
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width),
                              keras.layers.Dense(width)])
    model.compile(optimizer="adam", loss="mean_squared_error")
    x = np.zeros((2, width), "float32")
    model.train_on_batch(x, x)
    return model


def median_seconds(action, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes_mb", type=float, nargs="+", default=[31, 302])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    from candle_ckpt import keras_h5
    from candle_ckpt.checkpointer import Checkpointer
    from candle_ckpt.keras_callback import write_state

    print(f"{'state MB':>9} {'snapshot s':>11} {'full save s':>12} {'ratio':>6}")
    for size in args.sizes_mb:
        model = model_with_state(size)
        state = keras_h5.snapshot(model)
        snapshot = median_seconds(lambda: keras_h5.snapshot(model), args.repeats)
        with tempfile.TemporaryDirectory(dir=os.getcwd()) as root:
            checkpointer = Checkpointer({"ckpt_directory": root, "epochs": 1,
                                         "ckpt_save_best": False}, logger=None)
            epochs = iter(range(1, 10 ** 6))

            def full_save():
                checkpointer.save_now(next(epochs), functools.partial(
                    write_state, keras_h5.snapshot(model)), "benchmark")
            save = median_seconds(full_save, args.repeats)
        print(f"{state.nbytes / 1e6:9.0f} {snapshot:11.3f} {save:12.3f} {snapshot / save:6.2f}")
    print(f"command: PYTHONPATH=. python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main(sys.argv[1:])
