"""How long `candle-ckpt list` takes on a tree of 10 000 epochs.

    python benchmarks/bench_cli_list.py [--epochs 10000] [--repeat 5] [--keep]

Builds, in a temporary directory, the tree a 10 000-epoch run leaves with the default
keep policy (every epoch kept): tiny model files, and each ckpt-info.json exactly as the
library writes it, including `epochs_saved`, which lists every epoch of the run so far
(the file of epoch 10 000 is ~80 kB, the tree ~400 MB of JSON). Then it times:

- `candle-ckpt list DIR` as a subprocess (what an operator waits for: interpreter start,
  imports, survey, printing), the figure the README quotes, target <= 0.5 s;
- the survey in-process, and the baseline it replaces: `json.load` of every whole
  ckpt-info.json (no schema validation, which is slower still);

and prints medians and the ratio measured in the same run, and the command.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from candle_ckpt.core.checkpointer import Checkpointer  # noqa: E402
from candle_ckpt.core.info import TIMESTAMP_FORMAT, encode_info, read_info  # noqa: E402
from candle_ckpt.core.layout import INFO_FILE, CheckpointLayout  # noqa: E402
from candle_ckpt.core.policies import BestMetric  # noqa: E402
from candle_ckpt.core.protocol import point_link  # noqa: E402
from candle_ckpt.operator.inventory import survey  # noqa: E402

PAYLOAD = b"weights"


def write_payload(directory):
    """The model writer of the benchmark: a 7-byte model.h5."""
    with open(os.path.join(directory, "model.h5"), "wb") as stream:
        stream.write(PAYLOAD)
    return "model.h5"


def template_info(scratch):
    """A ckpt-info dict exactly as the library writes it: a real Checkpointer's 2nd save."""
    checkpointer = Checkpointer({"ckpt_directory": scratch, "epochs": 2,
                                 "ckpt_save_best_metric": "val_loss"}, logger=None)
    for epoch in (1, 2):
        checkpointer.epoch_end(epoch, {"val_loss": 1.0}, write_payload)
    info = read_info(checkpointer.layout.epoch_dir(2))
    shutil.rmtree(scratch)
    return info


def _epochs_saved_text(lines, count):
    # json.dumps(indent=1) of a list of ints one level deep, as encode_info writes it.
    return "[\n" + ",\n".join(lines[:count]) + "\n ]"


def build_tree(root, epochs):
    """Write the tree of an `epochs`-epoch run that kept every epoch; return its layout.

    Each record is the record of a real save (`template_info`) with the fields that
    change from epoch to epoch replaced, written by `encode_info`. Encoding a 10 000-long
    `epochs_saved` 10 000 times is slow in the pure-Python indenting encoder, so the
    list's text is spliced in; the splice is checked against `encode_info` of the full
    record at a few epochs.
    """
    template = template_info(root + ".template")
    layout = CheckpointLayout(root)
    os.makedirs(layout.epochs)
    best = BestMetric("val_loss", "min")
    lines = ["  %d" % epoch for epoch in range(1, epochs + 1)]
    checks = {1, 2, min(epochs, 1000), epochs}
    for epoch in range(1, epochs + 1):
        # A loss that falls and plateaus with noise, so `best` lags behind `last`.
        best.update(1.0 / epoch ** 0.5 + 0.05 * ((epoch * 7919) % 13) / 13, epoch)
        info = {**template, "epoch": epoch, "best_metric_last": best.value,
                "epoch_best": best.epoch, "epochs_saved": [epoch],
                "timestamp": time.strftime(TIMESTAMP_FORMAT)}
        text = encode_info(info).decode("utf-8").replace(
            '"epochs_saved": ' + _epochs_saved_text(["  %d" % epoch], 1),
            '"epochs_saved": ' + _epochs_saved_text(lines, epoch))
        if epoch in checks:
            assert text.encode("utf-8") == encode_info(
                {**info, "epochs_saved": list(range(1, epoch + 1))}), epoch
        directory = layout.epoch_dir(epoch)
        os.mkdir(directory)
        write_payload(directory)
        with open(os.path.join(directory, INFO_FILE), "w", encoding="utf-8") as stream:
            stream.write(text)
    point_link(layout, "best", best.epoch)
    point_link(layout, "last", epochs)
    return layout


def load_every_file_whole(layout):
    """The baseline: parse every ckpt-info.json whole, as a naive `list` would."""
    for epoch in layout.list_epochs():
        with open(os.path.join(layout.epoch_dir(epoch), INFO_FILE), "rb") as stream:
            json.load(stream)


def timed(function, repeat):
    """(median, min, max) wall seconds, and the median CPU seconds of child processes."""
    walls, cpus = [], []
    for _ in range(repeat):
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        function()
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime)
    return statistics.median(walls), min(walls), max(walls), statistics.median(cpus)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the tree and print its path")
    args = parser.parse_args(argv)
    top = tempfile.mkdtemp(prefix="bench_cli_list.")
    try:
        started = time.perf_counter()
        layout = build_tree(os.path.join(top, "save"), args.epochs)
        json_bytes = sum(os.path.getsize(os.path.join(layout.epoch_dir(e), INFO_FILE))
                         for e in layout.list_epochs())
        print(f"tree: {args.epochs} epochs, {json_bytes / 1e6:.0f} MB of ckpt-info.json, "
              f"built in {time.perf_counter() - started:.1f} s")
        # The installed console script when there is one next to this Python, else -m.
        script = os.path.join(os.path.dirname(sys.executable), "candle-ckpt")
        command = ([script] if os.path.exists(script) else
                   [sys.executable, "-m", "candle_ckpt"]) + ["list", layout.root]
        environment = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))

        def run_cli():
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment)

        run_cli()  # warm the page cache and the bytecode cache
        load = os.getloadavg()[0]
        cli = timed(run_cli, args.repeat)
        inside = timed(lambda: survey(layout), args.repeat)
        baseline = timed(lambda: load_every_file_whole(layout), args.repeat)
        print(f"{' '.join(command)}: wall median {cli[0]:.3f} s (min {cli[1]:.3f}, "
              f"max {cli[2]:.3f}), CPU {cli[3]:.3f} s; target <= 0.5 s wall")
        print(f"survey in-process: median {inside[0]:.3f} s (min {inside[1]:.3f}, "
              f"max {inside[2]:.3f})")
        print(f"baseline, json.load of every whole ckpt-info.json: median {baseline[0]:.3f} s "
              f"(min {baseline[1]:.3f}, max {baseline[2]:.3f}); survey / baseline = "
              f"{inside[0] / baseline[0]:.3f}")
        print(f"load average before: {load:.2f} on {os.cpu_count()} cores, "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
        print(f"reproduce: python benchmarks/bench_cli_list.py --epochs {args.epochs} "
              f"--repeat {args.repeat}")
        if args.keep:
            print(f"tree kept in {layout.root}")
    finally:
        if not args.keep:
            shutil.rmtree(top)


if __name__ == "__main__":
    main()
