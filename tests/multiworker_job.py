"""One worker of a MultiWorkerMirroredStrategy job for the tests, on localhost, CPU only.

    python tests/multiworker_job.py --ckpt_directory DIR --epochs 3 --out W.npz \\
        [--workers PORT0,PORT1 --index I] [--kill_at E:B] [--fail_restore]

With `--workers`, TF_CONFIG names one worker per loopback port and this process is
worker `--index`; without it, the same training runs in a single process (the
reference). Every worker restarts from DIR, trains to `--epochs` with the checkpoint
callback, and saves its final weights and optimizer variables to `--out`.
`--kill_at E:B` SIGKILLs the process after batch B of epoch E (every worker is given
the same point, so that they all die after the same step). `--ckpt_save_steps N`
saves a step checkpoint every N batches. Each worker prints on stderr "trained K
batches" (its optimizer's steps in this run) when fit ends. `--fail_restore` makes
loading the checkpoint fail on this worker only, after the workers agreed on it.

Keras 3.15 cannot run `model.fit` under MultiWorkerMirroredStrategy as it is
(keras-team/keras#20585): it calls `strategy.reduce` on a tuple of tensors, and with
`axis=0` on scalar losses. `KerasFriendlyMWMS` reduces element by element and drops
the axis for scalars, which is what the single-worker strategy does.
"""

import argparse
import json
import os
import sys

import numpy as np
from keras_job import at_batch, kill_myself, take_point


def parse(argv):
    argv, kill_at = take_point(argv, "--kill_at")
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt_directory", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", help="comma-separated loopback ports, one per worker")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--fail_restore", action="store_true")
    parser.add_argument("--ckpt_save_steps", type=int, default=0)
    return parser.parse_args(argv), kill_at


def make_strategy(tf, args):
    if not args.workers:
        return tf.distribute.get_strategy()
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"localhost:{port}" for port in args.workers.split(",")]},
            "task": {"type": "worker", "index": args.index},
        }
    )

    class KerasFriendlyMWMS(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def one(v):
                local = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
                return super(KerasFriendlyMWMS, self).reduce(
                    reduce_op, v, None if local.shape.rank == 0 else axis
                )

            return tf.nest.map_structure(one, value)

    return KerasFriendlyMWMS()


def main(argv):
    args, kill_at = parse(argv)
    import keras
    import tensorflow as tf

    import candle_ckpt

    strategy = make_strategy(tf, args)
    keras.utils.set_random_seed(7)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, 8)).astype("float32")
    y = (x @ rng.standard_normal((8, 1)) + 0.1).astype("float32")
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
        )
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mean_squared_error")
    params = {
        "ckpt_directory": args.ckpt_directory,
        "epochs": args.epochs,
        "ckpt_save_best_metric": "loss",
        "ckpt_save_steps": args.ckpt_save_steps,
    }
    if args.fail_restore:
        from candle_ckpt.keras import h5 as keras_h5

        def failing_restore(model, path, **_):
            raise candle_ckpt.CheckpointFormatError(f"'{path}': injected load failure")

        keras_h5.restore = failing_restore
    J = candle_ckpt.restart(params, model)
    trained_before = int(model.optimizer.iterations.numpy())
    callbacks = [candle_ckpt.CandleCheckpointCallback(params)]
    if kill_at:
        callbacks.append(at_batch(kill_at, kill_myself))
    model.fit(
        x,
        y,
        batch_size=64,
        epochs=args.epochs,
        initial_epoch=J["epoch"] if J else 0,
        shuffle=False,
        verbose=2,
        callbacks=callbacks,
    )
    trained = int(model.optimizer.iterations.numpy()) - trained_before
    print(f"trained {trained} batches", file=sys.stderr)
    np.savez(
        args.out,
        **{
            f"{group}{i}": v.numpy()
            for group, variables in (
                ("model_weights", model.weights),
                ("optimizer_weights", model.optimizer.variables),
            )
            for i, v in enumerate(variables)
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])
