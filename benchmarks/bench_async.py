"""Benchmark 6: training-thread stall per save, async / synchronous; epoch times.

A 100 MB model (300 MB of state) trains with model.fit for a few epochs of about 1-2 s
each, saving every epoch, three ways, interleaved run by run: no checkpointing,
synchronous saves, ckpt_async. Reported: the time on_epoch_end holds the training
thread (the stall) and the wall time per epoch.

    .venv/bin/python benchmarks/bench_async.py [--sizes 100MB] [--epochs 5] [--rounds 2]
"""

import argparse
import logging
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SIZES_MB, build_model, header, quiet_tensorflow, scratch_directory, summary


def run(model, mode, epochs, steps, directory):
    import keras
    import numpy as np

    import candle_ckpt

    width = model.input_shape[-1]
    x = np.random.default_rng(0).standard_normal((steps * 32, width)).astype("float32")
    stalls, epoch_times = [], []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.perf_counter() - self.started)

    callbacks = []
    if mode != "none":
        class Timed(candle_ckpt.CandleCheckpointCallback):
            def on_epoch_end(self, epoch, logs=None):
                started = time.perf_counter()
                super().on_epoch_end(epoch, logs)
                stalls.append(time.perf_counter() - started)

        root = os.path.join(directory, mode)
        callbacks.append(Timed({"ckpt_directory": root, "epochs": epochs,
                                "ckpt_save_best": False, "ckpt_keep_limit": 2,
                                "ckpt_async": mode == "async"}, verbose=False))
        logging.getLogger("candle_ckpt").propagate = False
    # the timer runs last, so an epoch's time includes the checkpoint stall
    model.fit(x, x, batch_size=32, epochs=epochs, verbose=0, shuffle=False,
              callbacks=callbacks + [EpochTimer()])
    if mode != "none":
        shutil.rmtree(os.path.join(directory, mode))
    return stalls, epoch_times[1:]  # the first epoch includes tracing


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100MB")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="batches per epoch")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    quiet_tensorflow()
    header("async save: training-thread stall and epoch time")
    directory = scratch_directory()
    try:
        for size in args.sizes.split(","):
            model = build_model(SIZES_MB[size])
            results = {mode: ([], []) for mode in ("none", "sync", "async")}
            for _ in range(args.rounds):
                for mode in results:
                    stalls, epochs = run(model, mode, args.epochs, args.steps, directory)
                    results[mode][0].extend(stalls)
                    results[mode][1].extend(epochs)
            print(f"{size} model")
            for mode, (stalls, epochs) in results.items():
                if stalls:
                    print(f"  {mode:5s} stall per save: {summary(stalls)}")
                print(f"  {mode:5s} epoch time:     {summary(epochs)}")
            ratio = (statistics.median(results["async"][0]) /
                     statistics.median(results["sync"][0]))
            print(f"  stall async / sync: ratio {ratio:.3f}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
