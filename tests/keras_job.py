"""A training job for the tests: the example benchmark, small, optionally killed.

    python tests/keras_job.py --ckpt_directory DIR --epochs 6 [--kill_at 4:3] [flags]

`--kill_at E:B` sends SIGKILL to this process after batch B of (1-based) epoch E: a
real kill -9 in the middle of an epoch, at a reproducible point.
"""

import importlib.util
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = ["--n_samples", "512", "--n_features", "16", "--dense", "[32,16]",
         "--batch_size", "64", "--ckpt_keep_limit", "1000"]


def load_example():
    path = os.path.join(HERE, os.pardir, "examples", "benchmark.py")
    spec = importlib.util.spec_from_file_location("example_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv):
    kill_at = None
    if "--kill_at" in argv:
        index = argv.index("--kill_at")
        kill_at = tuple(int(part) for part in argv[index + 1].split(":"))
        argv = argv[:index] + argv[index + 2:]
    example = load_example()
    params = example.initialize_parameters(SMALL + argv)

    import keras

    class KillAt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1

        def on_train_batch_end(self, batch, logs=None):
            if (self.epoch, batch + 1) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    example.run(params, callbacks=[KillAt()] if kill_at else [])


if __name__ == "__main__":
    main(sys.argv[1:])
