"""A training job for the tests: the example benchmark, small, optionally killed.

    python tests/keras_job.py --ckpt_directory DIR --epochs 6 [--kill_at 4:3] [flags]

`--kill_at E:B` sends SIGKILL to this process after batch B of (1-based) epoch E: a
real kill -9 in the middle of an epoch, at a reproducible point.

`--pause_at E:B` prints "PAUSED <pid>" on stdout after batch B of epoch E and waits
(up to 120 s) until a signal arrives, e.g. the test's `os.kill(pid, SIGUSR1)`: a real
signal from outside, always at the same point of training.

`--virtual_clock S` makes the wall clock of the wall-clock stop (core/run/walltime.py) run
S seconds ahead per trained batch: epochs then "take" a known time, so a test of
ckpt_walltime_margin stops at the same epoch however loaded the machine is.
`--subclassed` trains the same network as a subclassed `keras.Model` whose layers are
made in `__init__` and whose variables only exist after its first call (no `build`).
"""

import importlib.util
import os
import select
import signal
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = [
    "--n_samples",
    "512",
    "--n_features",
    "16",
    "--dense",
    "[32,16]",
    "--batch_size",
    "64",
    "--ckpt_keep_limit",
    "1000",
]


def load_example(file_name="benchmark.py"):
    """The module of examples/`file_name`, loaded without running its main()."""
    path = os.path.join(HERE, os.pardir, "examples", file_name)
    spec = importlib.util.spec_from_file_location(f"example_{file_name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def take_point(argv, flag):
    """Remove `flag E:B` from argv; return (argv, (E, B) or None)."""
    if flag not in argv:
        return argv, None
    index = argv.index(flag)
    point = tuple(int(part) for part in argv[index + 1].split(":"))
    return argv[:index] + argv[index + 2 :], point


def wait_for_a_signal():
    """Block until any signal arrives; its Python handler has run when this returns."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno())
    print(f"PAUSED {os.getpid()}", flush=True)
    ready, _, _ = select.select([reader], [], [], 120)
    signal.set_wakeup_fd(-1)
    if not ready:
        sys.exit("no signal within 120 s")


def main(argv):
    argv, kill_at = take_point(argv, "--kill_at")
    argv, pause_at = take_point(argv, "--pause_at")
    argv, tick = take_value(argv, "--virtual_clock")
    example = load_example()
    if "--subclassed" in argv:
        argv = [arg for arg in argv if arg != "--subclassed"]
        example.build_model = build_subclassed_model
    params = example.initialize_parameters(SMALL + argv)
    callbacks = []
    if tick is not None:
        advance = install_virtual_clock(tick)
        callbacks.append(at_every_batch(advance))
    if kill_at:
        callbacks.append(at_batch(kill_at, kill_myself))
    if pause_at:
        callbacks.append(at_batch(pause_at, wait_for_a_signal))
    example.run(params, callbacks=callbacks)


def take_value(argv, flag):
    """Remove `flag X` from argv; return (argv, float(X) or None)."""
    if flag not in argv:
        return argv, None
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :], float(argv[index + 1])


def install_virtual_clock(seconds_per_batch):
    """Make core/run/walltime.py's clock real time plus `seconds_per_batch` per call of
    the returned `advance()` (one call per trained batch)."""
    import time

    from candle_ckpt.core.run import walltime

    batches = [0]

    def advance():
        batches[0] += 1

    walltime.clock = lambda: time.time() + batches[0] * seconds_per_batch
    return advance


def at_every_batch(action):
    """A Keras callback calling `action()` after every trained batch."""
    import keras

    class EveryBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            action()

    return EveryBatch()


def build_subclassed_model(params):
    """The example's MLP as a compiled subclassed model, unbuilt until its first call."""
    import keras

    class LazyMLP(keras.Model):
        def __init__(self):
            super().__init__(name="lazy_mlp")
            self.hidden = []
            for width in params["dense"]:
                self.hidden.append(keras.layers.Dense(width, activation="relu"))
                self.hidden.append(keras.layers.Dropout(params["dropout"], seed=params["seed"]))
            self.head = keras.layers.Dense(1)

        def call(self, x, training=False):
            for layer in self.hidden:
                x = layer(x, training=training)
            return self.head(x)

    model = LazyMLP()
    model.compile(
        optimizer=keras.optimizers.Adam(params["learning_rate"]),
        loss="mean_squared_error",
        metrics=["mean_absolute_error"],
    )
    return model


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def at_batch(point, action):
    """A Keras callback calling `action()` after batch B of 1-based epoch E, point=(E, B)."""
    import keras

    class AtBatch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1

        def on_train_batch_end(self, batch, logs=None):
            if (self.epoch, batch + 1) == point:
                action()

    return AtBatch()


if __name__ == "__main__":
    main(sys.argv[1:])
