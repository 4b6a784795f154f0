"""Benchmark 6: training-thread stall per save, async / synchronous; epoch times.

A 100 MB model (300 MB of state) trains with model.fit for a few epochs of about 1-2 s
each, saving every epoch, three ways, interleaved run by run: no checkpointing,
synchronous saves, ckpt_async. Reported: the time on_epoch_end holds the training
thread (the stall; the first save of each run separately), the wall time per epoch
(the first epoch of a run, which traces the model, left out), and what checkpointing
costs an epoch: (async - none) / (sync - none), the share of the synchronous cost that
async saving leaves. Beside them, the state copied into aligned snapshot memory alone
(`common.copy_floor`): the least an async save that copies the state can stall.

    .venv/bin/python benchmarks/bench_async.py [--sizes 100MB] [--epochs 5] [--rounds 2] \
        [--quick]

The PyTorch counterpart is in bench_pytorch.py.
"""

import argparse
import logging
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    SIZES_MB,
    build_model,
    copy_floor,
    header,
    quiet_tensorflow,
    scratch_directory,
    summary,
)


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
        callbacks.append(
            Timed(
                {
                    "ckpt_directory": root,
                    "epochs": epochs,
                    "ckpt_save_best": False,
                    "ckpt_keep_limit": 2,
                    "ckpt_async": mode == "async",
                },
                verbose=False,
            )
        )
        logging.getLogger("candle_ckpt").propagate = False
    # the timer runs last, so an epoch's time includes the checkpoint stall
    model.fit(
        x,
        x,
        batch_size=32,
        epochs=epochs,
        verbose=0,
        shuffle=False,
        callbacks=callbacks + [EpochTimer()],
    )
    if mode != "none":
        shutil.rmtree(os.path.join(directory, mode))
    return stalls, epoch_times[1:]  # the first epoch includes tracing


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100MB")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="batches per epoch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="100MB, 1 round of 4 epochs")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rounds, args.epochs = "100MB", 1, 4
    quiet_tensorflow()
    header("async save: training-thread stall and epoch time")
    directory = scratch_directory()
    try:
        for size in args.sizes.split(","):
            model = build_model(SIZES_MB[size])
            results = {mode: ([], [], []) for mode in ("none", "sync", "async")}
            for _ in range(args.rounds):
                for mode in results:
                    stalls, epochs = run(model, mode, args.epochs, args.steps, directory)
                    if stalls:
                        results[mode][0].append(stalls[0])
                        results[mode][1].extend(stalls[1:])
                    results[mode][2].extend(epochs)
            state = [v.numpy() for v in model.weights + model.optimizer.variables]
            floor = copy_floor(state, len(results["async"][1]))
            print(f"{size} model")
            for mode, (first, stalls, epochs) in results.items():
                if stalls:
                    print(f"  {mode:5s} first save's stall: {summary(first)}")
                    print(f"  {mode:5s} later saves' stall: {summary(stalls)}")
                print(f"  {mode:5s} epoch time:          {summary(epochs)}")
            median = {
                mode: [statistics.median(r) for r in rs]
                for mode, rs in results.items()
                if mode != "none"
            }
            print(f"  stall async / sync: ratio {median['async'][1] / median['sync'][1]:.3f}")
            print(
                f"  first / later async stall: ratio {median['async'][0] / median['async'][1]:.3f}"
            )
            print(f"  state copied into snapshot memory alone: {summary(floor)}")
            print(
                f"  copy alone / sync stall (the least a copying snapshot stalls): ratio "
                f"{statistics.median(floor) / median['sync'][1]:.3f}"
            )
            none = statistics.median(results["none"][2])
            cost = {mode: statistics.median(results[mode][2]) - none for mode in median}
            print(
                f"  epoch cost (async - none) / (sync - none): {cost['async']:.3f} / "
                f"{cost['sync']:.3f} s = ratio {cost['async'] / cost['sync']:.3f}"
            )
        os.system("uptime")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
