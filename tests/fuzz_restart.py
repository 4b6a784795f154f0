"""Restart a PyTorch run from damaged, resealed checkpoints, each in a child process.

    python tests/fuzz_restart.py --seed S --count N [--seconds T] [--keep DIR]
    python tests/fuzz_restart.py --corpus tests/fuzz_corpus

Trains the small state of tests/test_pytorch_state.py (model, AdamW, StepLR, generator,
GradScaler) and saves one epoch. Then, case after case: flips one byte of its model.h5 or
ckpt-info.json (seeded by S), reseals the epoch (every file's size and CRC32, and
`info_crc32`, recomputed: what anyone who can write the tree can do), and restarts
fresh objects from it in a forked child, under RLIMIT_AS (what the process has plus
--memory MiB) and a timeout, until N cases or T seconds. --keep saves the damaged file of each
case that is neither loaded nor refused into DIR, as model.h5.<label> or
ckpt-info.json.<label>; --corpus replays the files of such a directory instead
(tests/fuzz_corpus).

Prints one JSON line per case, {"case", "file", "offset", "value", "outcome",
"detail"}, the outcome one of:
  loaded    the restart loaded the checkpoint (the flip hit a value, or nothing read)
  refused   a CheckpointError (exit status 3) and every object exactly as it was
  changed   a CheckpointError, but some object changed (a partial load)
  raw       any other exception (its type and message in "detail")
  crash     the child died of a signal
  hang      the child did not finish within the timeout
"""

import argparse
import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from test_pytorch_state import trained  # noqa: E402

import candle_ckpt  # noqa: E402
from candle_ckpt import hdf5_check  # noqa: E402
from candle_ckpt.core.errors import CheckpointError, exit_status  # noqa: E402
from candle_ckpt.core.format.info import info_file_bytes  # noqa: E402
from candle_ckpt.pytorch import state  # noqa: E402

FILES = ("model.h5", "ckpt-info.json")


def params(root):
    return {
        "ckpt_directory": root,
        "epochs": 2,
        "ckpt_restart_mode": "required",
        "ckpt_save_interval": 1,
    }


def make_tree(root):
    """One saved epoch of `trained()`; returns the epoch directory."""
    ckpt = candle_ckpt.CandleCkptPyTorch(params(root), logger=None, verbose=False)
    ckpt.set_model(trained(seed=0))
    ckpt.ckpt_epoch(0, {"val_loss": 1.0})
    ckpt.finish()
    return os.path.join(root, "ckpts", "epochs", "001")


def reseal(directory, model_bytes, info_text):
    """Write the epoch's files, their sizes and CRC32s (and `info_crc32`) recomputed
    into `info_text` where it still parses as a dict with a "files" dict."""
    with open(os.path.join(directory, "model.h5"), "wb") as stream:
        stream.write(model_bytes)
    try:
        info = json.loads(info_text)
        entry = info["files"]["model.h5"]
        entry["size"], entry["crc32"] = len(model_bytes), str(zlib.crc32(model_bytes))
        info["checksum"] = entry["crc32"]
        info.pop("info_crc32", None)
        info_text = info_file_bytes(info)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        pass  # a flip that broke the JSON: written as it is, for the reader to refuse
    with open(os.path.join(directory, "ckpt-info.json"), "wb") as stream:
        stream.write(info_text)


def fingerprint(objects):
    """Everything a restart may change, as comparable bytes."""
    parts = []

    def add(value):
        if isinstance(value, torch.Tensor):
            parts.append(repr((value.dtype, tuple(value.shape))).encode())
            parts.append(value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in value:
                parts.append(repr(key).encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        else:
            parts.append(repr(value).encode())

    add(state.object_states(objects, False))
    add(state.rng_states())
    return zlib.crc32(b"".join(parts))


def restart_in_child(root, objects, memory_bytes, timeout):
    """(outcome, detail) of one restart of `objects` from `root`, in a fork: the objects
    stay as they are here, whatever the child does."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.close(read_end)
            with open("/proc/self/statm") as stream:
                mapped = int(stream.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_bytes, resource.RLIM_INFINITY))
            # Taken here: the random module reseeds itself in a forked child.
            before = fingerprint(objects)
            ckpt = candle_ckpt.CandleCkptPyTorch(params(root), logger=None, verbose=False)
            ckpt.set_model(objects)
            try:
                ckpt.restart(verbose=False)
                result = ("loaded", "")
            except CheckpointError as error:
                unchanged = fingerprint(objects) == before
                result = (
                    "refused" if unchanged and exit_status(error) == 3 else "changed",
                    f"{type(error).__name__}: {error}",
                )
            except BaseException as error:
                result = ("raw", f"{type(error).__name__}: {error}")
            os.write(write_end, json.dumps(result).encode()[:60000])
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            return "hang", f"no end within {timeout} s"
        time.sleep(0.005)
    report = b""
    while chunk := os.read(read_end, 65536):
        report += chunk
    os.close(read_end)
    if os.WIFSIGNALED(status):
        return "crash", signal.Signals(os.WTERMSIG(status)).name
    if not report:
        return "raw", f"child exited with status {os.WEXITSTATUS(status)}, no report"
    outcome, detail = json.loads(report)
    return outcome, detail


def flips(seed, count, pristine):
    """(file, offset, value) of `count` one-byte flips: most into model.h5's headers
    and its JSON state (where a flip is read as structure), some into ckpt-info.json."""
    rng = random.Random(seed)
    for _ in range(count):
        name = "ckpt-info.json" if rng.random() < 0.2 else "model.h5"
        size = len(pristine[name])
        offset = rng.randrange(min(size, 16384) if rng.random() < 0.8 else size)
        value = pristine[name][offset] ^ (1 << rng.randrange(8))
        if rng.random() < 0.3:
            value = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)])
        yield name, offset, value


def corpus_cases(corpus):
    """(file, entry name, None) of each entry of the corpus directory."""
    return [
        (name, entry, None)
        for entry in sorted(os.listdir(corpus))
        for name in FILES
        if entry.startswith(name + ".")
    ]


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seconds", type=float, help="stop starting cases after this")
    parser.add_argument("--corpus", help="replay this corpus rather than flip bytes")
    parser.add_argument("--keep", help="save the damaged file of each failure here")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--memory", type=int, default=512, help="MiB")
    args = parser.parse_args(argv)
    started = time.monotonic()
    torch.set_num_threads(1)
    # A hang is reported by the checker itself, well within this harness's timeout.
    hdf5_check.CHECK_SECONDS = args.timeout / 4
    # The saved state holds the random states: seeded, the same seed flips the same bytes.
    random.seed(0)
    np.random.seed(0)
    root = tempfile.mkdtemp(prefix="candle_ckpt_fuzz_")
    try:
        directory = make_tree(os.path.join(root, "save"))
        pristine = {}
        for name in FILES:
            with open(os.path.join(directory, name), "rb") as stream:
                pristine[name] = stream.read()
        objects = trained(seed=1, steps=1)
        # The checker process starts here, once: each case's fork uses it (and starts
        # another only when a case ended it).
        hdf5_check.check(pristine["model.h5"], "the pristine model.h5")
        if args.corpus:
            cases = corpus_cases(args.corpus)
        else:
            cases = list(flips(args.seed, args.count, pristine))
        for number, (name, offset, value) in enumerate(cases):
            if args.seconds is not None and time.monotonic() - started > args.seconds:
                break
            damaged = dict(pristine)
            if args.corpus:
                with open(os.path.join(args.corpus, offset), "rb") as stream:
                    damaged[name] = stream.read()
            else:
                data = bytearray(pristine[name])
                data[offset] = value
                damaged[name] = bytes(data)
            reseal(directory, damaged["model.h5"], damaged["ckpt-info.json"])
            outcome, detail = restart_in_child(
                os.path.join(root, "save"), objects, args.memory << 20, args.timeout
            )
            if args.keep and outcome not in ("loaded", "refused"):
                label = f"{name}.seed{args.seed}-case{number}-{outcome}"
                with open(os.path.join(args.keep, label), "wb") as stream:
                    stream.write(damaged[name])
            record = {"case": number, "file": name, "offset": offset, "value": value}
            record.update(outcome=outcome, detail=detail[:400])
            print(json.dumps(record), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
