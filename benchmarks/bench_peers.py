"""Benchmark 7: save and restore, candle_ckpt against the other ways to checkpoint Keras.

The same model and optimizer (a 4-layer MLP with Adam built, state = 3x the parameters)
is saved and restored five ways, interleaved repetition by repetition:

- candle_ckpt: the callback's full synchronous save (snapshot, write, fsync, CRC32,
  ckpt-info.json, rename, links, keep limit 2) and `candle_ckpt.restart` (ckpt-info
  validation and the CRC32 of every file included);
- tf_checkpoint: `tf.train.Checkpoint(model=, optimizer=).write(prefix)` + fsync of its
  files, and `.restore(prefix)`;
- keras_weights_h5: `model.save_weights("x.weights.h5")` + fsync, and
  `model.load_weights("x.weights.h5")` (optimizer state included in Keras 3);
- keras_model: `model.save("x.keras")` + fsync, and `keras.models.load_model("x.keras")`
  (which also rebuilds and compiles the model).

Every saved file is fsynced, as a checkpoint that survives a power loss must be. Files
are in the page cache at restore time, as on a restart right after a save. The ratios
are each peer's median over candle_ckpt's for saves (above 1: candle_ckpt is faster),
and candle_ckpt's over each peer's for restores (below 1: candle_ckpt is faster).

    .venv/bin/python benchmarks/bench_peers.py [--sizes 100MB,1GB] [--repetitions 5] \\
        [--directory DIR] [--quick]

--quick: 100MB only, 3 repetitions. PyTorch's peers (torch.save, torch.load) are in
bench_pytorch.py.
"""

import argparse
import glob
import logging
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
    SIZES_MB,
    against_fastest,
    build_model,
    callback_save,
    directory_argument,
    header,
    interleave,
    quiet_tensorflow,
    scratch_directory,
    state_bytes,
    summary,
)

from candle_ckpt.core.storage.durable import fsync_dir, fsync_file


def fsynced(paths, directory):
    """fsync every file that `paths` (glob patterns) name, then their directory."""
    for pattern in paths:
        for path in glob.glob(pattern):
            fsync_file(path)
    fsync_dir(directory)


def measure(size, repetitions, directory):
    return measure_model(build_model(SIZES_MB[size]), size, repetitions, directory)


PEERS = ("tf_checkpoint", "keras_weights_h5", "keras_model")


def measure_model(model, label, repetitions, directory, peers=PEERS):
    """Save and restore times of a compiled `model` whose optimizer is built, candle_ckpt
    and `peers` (some of `PEERS`) interleaved: (state bytes, saves, restores),
    {name: [seconds]} each. Every restore goes into `model` itself (`load_model` makes
    a new one)."""
    import keras
    import tensorflow as tf

    import candle_ckpt

    root = os.path.join(directory, f"ckpt-{label}")
    files = os.path.join(directory, f"peers-{label}")
    os.makedirs(files)
    prefix = os.path.join(files, "tf", "ckpt")
    weights = os.path.join(files, "x.weights.h5")
    keras_file = os.path.join(files, "x.keras")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)

    def tf_save():
        checkpoint.write(prefix)
        fsynced([prefix + ".*"], os.path.dirname(prefix))

    def weights_save():
        model.save_weights(weights)
        fsynced([weights], files)

    def keras_save():
        model.save(keras_file)
        fsynced([keras_file], files)

    peer_saves = {
        "tf_checkpoint": tf_save,
        "keras_weights_h5": weights_save,
        "keras_model": keras_save,
    }
    saves = interleave(
        repetitions,
        warmup=1,
        candle_ckpt=callback_save(model, root),
        **{name: peer_saves[name] for name in peers},
    )
    logging.getLogger("candle_ckpt").propagate = False
    params = {"ckpt_directory": root, "ckpt_restart_mode": "required"}
    peer_restores = {
        "tf_checkpoint": lambda: checkpoint.restore(prefix),
        "keras_weights_h5": lambda: model.load_weights(weights),
        "keras_model": lambda: keras.models.load_model(keras_file),
    }
    restores = interleave(
        repetitions,
        warmup=2,
        candle_ckpt=lambda: candle_ckpt.restart(params, model, verbose=False),
        **{name: peer_restores[name] for name in peers},
    )
    shutil.rmtree(root)
    shutil.rmtree(files)
    return state_bytes(model), saves, restores


def report(kind, times, ours_first):
    width = max(map(len, times))
    print(f"  {kind}")
    for name, seconds in times.items():
        print(f"    {name:{width}s} {summary(seconds)}")
    ours = statistics.median(times["candle_ckpt"])
    for name, seconds in times.items():
        if name == "candle_ckpt":
            continue
        theirs = statistics.median(seconds)
        if ours_first:
            print(f"    candle_ckpt / {name}: ratio {ours / theirs:.3f}")
        else:
            print(f"    {name} / candle_ckpt: ratio {theirs / ours:.3f}")
    peer, ratio, _ = against_fastest(times)
    print(f"    candle_ckpt / fastest peer ({peer}): ratio {ratio:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100MB,1GB")
    parser.add_argument("--repetitions", type=int, default=5)
    directory_argument(parser)
    parser.add_argument("--quick", action="store_true", help="100MB, 3 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repetitions = "100MB", 3
    quiet_tensorflow()
    header("save and restore: candle_ckpt and its peers, same model and optimizer")
    directory = scratch_directory(args.directory)
    try:
        for size in args.sizes.split(","):
            nbytes, saves, restores = measure(size, args.repetitions, directory)
            print(f"{size} model, {nbytes / 1e6:.0f} MB state")
            report("save (fsync included)", saves, ours_first=False)
            report("restore (candle_ckpt: verification included)", restores, ours_first=True)
        os.system("uptime")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
