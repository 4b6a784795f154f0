"""Benchmark 9: save and restore against the peers, by model shape (issue 35).

A checkpoint of a few big arrays and one of thousands of small ones cost different
things: the bytes, or the work per tensor. Each framework's models here are saved and
restored by candle_ckpt and by its peers, interleaved repetition by repetition in the
same run, with the measurements of bench_peers.py (Keras: `tf.train.Checkpoint`,
`save_weights`/`load_weights`, `model.save`/`load_model` of a `.keras` file) and
bench_pytorch.py (`torch.save` + fsync, `torch.load(weights_only=True)` +
`load_state_dict`). Every save is fsynced; a restore is candle_ckpt's verified restart
(ckpt-info validation, the CRC32 of every byte before anything reaches the model)
into the live model and optimizer. The shapes, each with its optimizer after one step:

- transformer: an encoder of 12 layers, width 256, 8 heads, feed-forward 1024; PyTorch
  `nn.TransformerEncoder`, Keras blocks of `MultiHeadAttention`, `LayerNormalization`
  and `Dense` (about 114 MB of state, AdamW / Adam);
- deep: a deep narrow stack, PyTorch 500 x `Linear(64, 64)` (AdamW), Keras 300 x
  `Dense(64)` (Adam);
- mlp: the MLPs of bench_peers.py and bench_pytorch.py (`--mlp-size` of parameters);
- transformer-768 (with `--large`): width 768, 12 heads, feed-forward 3072 (BERT-base
  sized, about 1 GB of state).

For each shape the report gives the number of tensors (the model's and the optimizer's),
the state's size, every timing, ours / the fastest peer (medians; below 1 candle_ckpt is
faster) for save and for restore, and the cost per tensor, (ours - that peer) / tensors,
in milliseconds; then one table of every shape.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_shapes.py [--frameworks keras,pytorch] \\
        [--shapes transformer,deep,mlp] [--large] [--mlp-size 100MB] [--repetitions 5] \\
        [--directory DIR] [--quick] [--profile N]

--profile N: no peers; one save and one restore of candle_ckpt per shape under
cProfile (after an untimed one each; the calling thread's CPU time), the N functions of
most own time printed.

--quick: 3 repetitions, MLPs of 10 MB of parameters, and Keras without the `.keras`
peer, whose `load_model` rebuilds the whole model (tens of seconds for the deep stack)
and is never the fastest: about two minutes on a quiet 2-core machine.
"""

import argparse
import cProfile
import functools
import io
import os
import pstats
import shutil
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_peers
import bench_pytorch
from common import (
    SIZES_MB,
    against_fastest,
    build_model,
    callback_save,
    directory_argument,
    footer,
    header,
    quiet_tensorflow,
    scratch_directory,
    summary,
    timed,
)

# (width, heads, feed-forward width) of the encoders; 12 layers each.
TRANSFORMERS = {"transformer": (256, 8, 1024), "transformer-768": (768, 12, 3072)}
ENCODER_LAYERS = 12
SEQUENCE = 16
DEEP_LAYERS = {"keras": 300, "pytorch": 500}
DEEP_WIDTH = 64


def keras_transformer(shape, seed=0):
    """A compiled Keras encoder of `ENCODER_LAYERS` post-norm blocks, Adam after a step."""
    import keras
    import numpy as np

    width, heads, feedforward = shape
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SEQUENCE, width))
    x = inputs
    for _ in range(ENCODER_LAYERS):
        attended = keras.layers.MultiHeadAttention(heads, width // heads)(x, x)
        x = keras.layers.LayerNormalization()(keras.layers.Add()([x, attended]))
        hidden = keras.layers.Dense(feedforward, activation="relu")(x)
        x = keras.layers.LayerNormalization()(
            keras.layers.Add()([x, keras.layers.Dense(width)(hidden)])
        )
    model = keras.Model(inputs, x)
    model.compile(optimizer="adam", loss="mean_squared_error")
    batch = np.zeros((2, SEQUENCE, width), "float32")
    model.train_on_batch(batch, batch)
    return model


def keras_deep(layers, seed=0):
    """A compiled Keras stack of `layers` Dense(64), Adam after a step."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((DEEP_WIDTH,))] + [keras.layers.Dense(DEEP_WIDTH) for _ in range(layers)]
    )
    model.compile(optimizer="adam", loss="mean_squared_error")
    batch = np.zeros((8, DEEP_WIDTH), "float32")
    model.train_on_batch(batch, batch)
    return model


def torch_stepped(model, inputs):
    """`model` and an AdamW optimizer after one step on `inputs`, so its state exists."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(inputs).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def torch_transformer(shape, seed=0):
    """An `nn.TransformerEncoder` of `ENCODER_LAYERS` layers and its AdamW."""
    import torch

    width, heads, feedforward = shape
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(
        width, heads, dim_feedforward=feedforward, batch_first=True
    )
    model = torch.nn.TransformerEncoder(layer, ENCODER_LAYERS, enable_nested_tensor=False)
    return torch_stepped(model, torch.randn(2, SEQUENCE, width))


def torch_deep(layers, seed=0):
    """`layers` x Linear(64, 64) in an `nn.Sequential`, and its AdamW."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*(torch.nn.Linear(DEEP_WIDTH, DEEP_WIDTH) for _ in range(layers)))
    return torch_stepped(model, torch.zeros(2, DEEP_WIDTH))


def keras_model(name, args):
    """The Keras model of shape `name`, compiled, Adam after a step."""
    if name in TRANSFORMERS:
        return keras_transformer(TRANSFORMERS[name])
    if name == "deep":
        return keras_deep(DEEP_LAYERS["keras"])
    return build_model(SIZES_MB[args.mlp_size])


def torch_builder(name, args):
    """(build, spec) of the PyTorch shape `name`: `build(spec, seed)` makes the model and
    its AdamW after a step."""
    if name in TRANSFORMERS:
        return torch_transformer, TRANSFORMERS[name]
    if name == "deep":
        return torch_deep, DEEP_LAYERS["pytorch"]
    return bench_pytorch.build, SIZES_MB[args.mlp_size]


def keras_shape(name, args, directory):
    """(tensors, state bytes, saves, restores) of the Keras model of shape `name`;
    `args.quick` leaves out the `.keras` peer."""
    model = keras_model(name, args)
    tensors = len(model.weights) + len(model.optimizer.variables)
    peers = [peer for peer in bench_peers.PEERS if not (args.quick and peer == "keras_model")]
    nbytes, saves, restores = bench_peers.measure_model(
        model, "keras-" + name, args.repetitions, directory, peers
    )
    return tensors, nbytes, saves, restores


def pytorch_shape(name, args, directory):
    """(tensors, state bytes, saves, restores) of the PyTorch model of shape `name`."""
    build, spec = torch_builder(name, args)
    model, optimizer = build(spec)
    tensors = len(bench_pytorch.state_tensors(model, optimizer))
    del model, optimizer
    nbytes, saves, restores = bench_pytorch.measure_model(
        build, spec, "pytorch-" + name, args.repetitions, directory, cold=False
    )
    del saves["candle_ckpt_cpu"]  # bench_pytorch.py reports it; here only wall times
    return tensors, nbytes, saves, restores


def profiled(label, function, top):
    """Run `function` once under cProfile and print its `top` functions by own time.

    The clock is the calling thread's CPU time: the per-tensor work is CPU in that
    thread, and on a machine shared with other jobs a wall-clock profile charges every
    wait for a core to whichever function was running. Waits for the disk or for other
    threads (fsync, the CRC thread) are therefore not in it; the wall time is printed.
    """
    profile = cProfile.Profile(time.thread_time)
    wall = timed(functools.partial(profile.runcall, function))
    stream = io.StringIO()
    pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(top)
    print(f"  {label}: {wall:.3f} s wall; cProfile of this thread's CPU time, by tottime:")
    print(textwrap.indent(stream.getvalue().strip(), "    "))


def keras_profile(name, args, directory):
    """Profile one save and one verified restart of the Keras shape `name`, each after
    one untimed run (tracing, first-use costs)."""
    import candle_ckpt

    model = keras_model(name, args)
    root = os.path.join(directory, "profile-keras-" + name)
    save = callback_save(model, root)
    params = {"ckpt_directory": root, "ckpt_restart_mode": "required"}

    def restart():
        candle_ckpt.restart(params, model, verbose=False)

    save()
    profiled("save", save, args.profile)
    save.end()
    restart()
    profiled("restore", restart, args.profile)
    shutil.rmtree(root)


def pytorch_profile(name, args, directory):
    """Profile one save and one verified restart (into a second model and optimizer) of
    the PyTorch shape `name`, each after one untimed run."""
    build, spec = torch_builder(name, args)
    model, optimizer = build(spec)
    root = os.path.join(directory, "profile-pytorch-" + name)
    ckpt = bench_pytorch.session(root, model, optimizer, keep_limit=None)
    epochs = iter(range(10**6))
    fresh_model, fresh_optimizer = build(spec, seed=1)

    def save():
        ckpt.ckpt_epoch(next(epochs))

    def restart():
        bench_pytorch.restart_into(root, fresh_model, fresh_optimizer)

    save()
    profiled("save", save, args.profile)
    ckpt.finish()
    restart()
    profiled("restore", restart, args.profile)
    shutil.rmtree(root)


PROFILES = {"keras": keras_profile, "pytorch": pytorch_profile}

SHAPE_NAMES = {
    "transformer": "transformer d=256 x12",
    "transformer-768": "transformer d=768 x12",
    "deep": "deep {layers} x {width}",
    "mlp": "MLP {mlp}",
}


def shape_label(framework, name, mlp):
    return SHAPE_NAMES[name].format(layers=DEEP_LAYERS[framework], width=DEEP_WIDTH, mlp=mlp)


def compare(kind, times, tensors):
    """Print every timing of `kind` and ours against the fastest peer; return
    (peer, ratio, milliseconds per tensor)."""
    width = max(map(len, times))
    print(f"  {kind}")
    for name, seconds in times.items():
        print(f"    {name:{width}s} {summary(seconds)}")
    peer, ratio, excess = against_fastest(times)
    per_tensor = excess / tensors * 1e3
    print(
        f"    candle_ckpt / fastest peer ({peer}): ratio {ratio:.3f}; "
        f"(ours - {peer}) / tensors = {per_tensor:+.4f} ms per tensor"
    )
    return peer, ratio, per_tensor


def draw_chart(rows, path, options):
    """A bar per shape and kind (save, restore) of ours / the fastest peer, on a log
    scale with the parity line: the picture of the table, made from the same run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{framework}\n{label}" for framework, label, *_ in rows]
    positions = range(len(rows))
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.2))
    for offset, kind, column in ((-0.2, "save", 4), (0.2, "restore", 5)):
        ratios = [row[column][1] for row in rows]
        axes.bar([p + offset for p in positions], ratios, width=0.4, label=kind)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_ylabel("candle_ckpt / fastest peer (below 1: faster)")
    axes.set_xticks(list(positions), labels, fontsize=8)
    axes.legend()
    axes.set_title(f"bench_shapes.py {options} ({time.strftime('%Y-%m-%d %H:%M')})", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    print(f"# chart: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="keras,pytorch")
    parser.add_argument("--shapes", default="transformer,deep,mlp")
    parser.add_argument(
        "--large", action="store_true", help="also the d=768 transformer (about 1 GB of state)"
    )
    parser.add_argument(
        "--mlp-size", default=None, choices=sorted(SIZES_MB), help="default 100MB; 10MB quick"
    )
    parser.add_argument("--repetitions", type=int, default=5)
    directory_argument(parser)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="instead of timing against the peers, profile one save and one restore of "
        "candle_ckpt per shape and print the N functions of most own time",
    )
    parser.add_argument(
        "--chart",
        metavar="FILE",
        help="also draw the table's ratios (ours / fastest peer, save and restore, per "
        "shape) into FILE (.png or .svg; needs matplotlib)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 repetitions, 10MB MLPs, Keras without the .keras peer",
    )
    args = parser.parse_args()
    if args.quick:
        args.repetitions = 3
    args.mlp_size = args.mlp_size or ("10MB" if args.quick else "100MB")
    shapes = args.shapes.split(",") + (["transformer-768"] if args.large else [])
    measure = {"keras": keras_shape, "pytorch": pytorch_shape}
    quiet_tensorflow()
    if args.profile:
        header("where candle_ckpt's save and restore spend their time, by model shape")
        directory = scratch_directory(args.directory)
        try:
            for framework in args.frameworks.split(","):
                for name in shapes:
                    print(f"{framework} {shape_label(framework, name, args.mlp_size)}")
                    PROFILES[framework](name, args, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    header("save and restore against the peers, by model shape")
    directory = scratch_directory(args.directory)
    rows = []
    try:
        for framework in args.frameworks.split(","):
            for name in shapes:
                tensors, nbytes, saves, restores = measure[framework](name, args, directory)
                label = shape_label(framework, name, args.mlp_size)
                print(f"{framework} {label}: {tensors} tensors, {nbytes / 1e6:.0f} MB state")
                save = compare("save (fsync included)", saves, tensors)
                restore = compare("restore (candle_ckpt: verification included)", restores, tensors)
                rows.append((framework, label, tensors, nbytes, save, restore))
        print()
        print(
            "| framework | shape | tensors | state | save: ours / fastest peer "
            "| per tensor | restore: ours / fastest peer | per tensor |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for framework, label, tensors, nbytes, save, restore in rows:
            cells = [framework, label, str(tensors), f"{nbytes / 1e6:.0f} MB"]
            for peer, ratio, per_tensor in (save, restore):
                cells += [f"**{ratio:.2f}** ({peer})", f"{per_tensor:+.3f} ms"]
            print("| " + " | ".join(cells) + " |")
        footer(args.repetitions)
        if args.chart:
            draw_chart(rows, args.chart, " ".join(sys.argv[1:]))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
