"""Benchmark: writing a model file's bulk with O_DIRECT against the page cache.

A file of the given size is laid out (truncated to size, as h5py leaves the space of
its large datasets) and its whole content written and fsynced, interleaved repetition
by repetition, each way timed for wall time and for the CPU time of the process (all
threads, user + system: what a background save takes from training on busy cores):

- buffered: `os.pwrite` of PIECE_BYTES pieces through the page cache, then fsync (what
  `direct_io.write_at` did before O_DIRECT, and still does where it is refused);
- direct: `direct_io.write_at` from page-aligned memory (a snapshot): O_DIRECT from
  the memory itself, the CRC32 from memory in the CRC thread, then fsync;
- bounce: `direct_io.write_at` from memory off a page boundary (a live tensor, a sync
  save): copied BOUNCE_BYTES at a time into an aligned buffer, written from there;
- bounce-<N>MiB (`--bounce-mib`): the same with another bounce buffer size;
- buffered+crc32_file, the baseline of the ratios: buffered, then the CRC32 read back
  from the file (`checksum.crc32_file`), as the save path did before O_DIRECT.

Then, copy into a snapshot: a copy of the same size from numpy's memory into reused
page-aligned huge-page memory, `np.copyto` (one thread) against `direct_io.copy_into`
(two threads from PARALLEL_COPY_BYTES on): the snapshot's part of an async save's stall.

These are the measurements the comments of core/storage/direct_io.py refer to.

--saves: whole synchronous saves instead (issue 29: is a save training waits for
faster through the page cache?), each framework's in its own process
(`save_worker.py`: the callback's `on_epoch_end` for a Keras MLP, `ckpt_epoch` for a
PyTorch Linear, both with Adam's state, `--megabytes` of state in all), interleaved
save by save with the raw buffered and direct writes above of the same number of bytes:

- keras/pytorch chosen: the save as the library makes it (O_DIRECT, the live tensors
  through the bounce buffer);
- keras/pytorch page cache: the same with every byte through the page cache, as on a
  file system that refuses O_DIRECT;
- keras/pytorch <commit> (`--against`, default 48132fc, the last commit before
  O_DIRECT; '' for none): that commit's code, extracted with `git archive`, saving the
  same model (PyTorch where the commit has it).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_direct_write.py [--megabytes 100,1000]
        [--repetitions 5] [--bounce-mib 8] [--directory DIR]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_direct_write.py --saves
        [--megabytes 100,400] [--repetitions 7] [--against 48132fc,COMMIT]
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import header, interleave, ratio_line, scratch_directory, summary

from candle_ckpt.core.storage import direct_io
from candle_ckpt.core.storage.checksum import crc32_file
from candle_ckpt.core.storage.durable import fsync_file
from candle_ckpt.core.storage.memory import anonymous_memory


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def laid_out(path, size):
    with open(path, "wb") as stream:
        stream.truncate(size)


def buffered(path, source, with_crc=False):
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, len(source), direct_io.PIECE_BYTES):
            os.pwrite(fd, source[offset : offset + direct_io.PIECE_BYTES], offset)
    finally:
        os.close(fd)
    fsync_file(path)
    if with_crc:
        crc32_file(path)


def through_write_at(path, source):
    written = direct_io.write_at(path, [(0, source)])
    fsync_file(path)
    return written


def measure(megabytes, directory, repetitions, bounce_mib):
    """{name: [wall seconds]}, {name: [CPU seconds]} of every way, interleaved."""
    size = megabytes * 10**6
    memory = anonymous_memory(size + direct_io.ALIGNMENT)
    whole = memoryview(memory)
    whole[:] = os.urandom(len(whole))
    aligned = whole[:size]
    unaligned = whole[64 : 64 + size]  # where a CPU allocator's tensor may start
    path = os.path.join(directory, "model.h5")
    candidates = {
        "buffered": lambda: buffered(path, aligned),
        "buffered+crc32_file": lambda: buffered(path, aligned, with_crc=True),
        "direct": lambda: through_write_at(path, aligned),
        "bounce": lambda: through_write_at(path, unaligned),
    }
    if bounce_mib:

        def bounce_other():
            default, direct_io.BOUNCE_BYTES = direct_io.BOUNCE_BYTES, bounce_mib << 20
            try:
                through_write_at(path, unaligned)
            finally:
                direct_io.BOUNCE_BYTES = default

        candidates[f"bounce-{bounce_mib}MiB"] = bounce_other
    wall = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates}
    for repetition in range(repetitions + 1):  # the first is a warm-up
        for name, function in candidates.items():
            if os.path.exists(path):
                os.unlink(path)
            laid_out(path, size)
            started, before = time.perf_counter(), cpu_seconds()
            function()
            if repetition:
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(cpu_seconds() - before)
    return wall, cpu


def measure_copy(megabytes, repetitions):
    import numpy as np

    source = np.random.default_rng(0).integers(0, 256, megabytes * 10**6, dtype=np.uint8)
    target = np.frombuffer(anonymous_memory(source.nbytes), np.uint8)
    np.copyto(target, source)  # fault the pages in, as a reused snapshot has them
    return interleave(
        repetitions,
        warmup=1,
        np_copyto=lambda: np.copyto(target, source),
        copy_into=lambda: direct_io.copy_into(target, source),
    )


HERE = os.path.dirname(os.path.abspath(__file__))


class SaveWorker:
    """A `save_worker.py` process saving a `framework` model of `megabytes` of state
    with the library found in `tree`."""

    def __init__(self, framework, megabytes, directory, tree):
        environment = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
        self.errors = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "save_worker.py"), framework, str(megabytes)]
            + [os.path.abspath(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
            env=environment,
        )
        self.state_bytes = self._answer()["state_bytes"]

    def save(self, mode):
        self.process.stdin.write(mode + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self):
        line = self.process.stdout.readline()
        if not line:
            status = self.process.wait()
            self.errors.seek(0)
            raise RuntimeError(f"a save worker ended with status {status}: {self.errors.read()}")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()
        self.errors.close()


def extract_commit(commit):
    """A temporary directory holding `commit`'s files (`git archive`), or None with a
    note when this is not a git checkout that has it."""
    target = tempfile.mkdtemp(prefix=f"candle_ckpt-{commit}-")
    archive = subprocess.run(
        ["git", "-C", os.path.dirname(HERE), "archive", commit], capture_output=True
    )
    if archive.returncode != 0:
        print(f"# commit {commit} not measured: {archive.stderr.decode().strip()}")
        shutil.rmtree(target)
        return None
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    return target


def save_candidates(megabytes, directory, trees):
    """The save workers and {name: (worker, write path)} of every save to time: each
    framework's save in this tree as the library makes it ("chosen", O_DIRECT) and with
    the page cache forced ("page cache"), and in each of `trees` ({commit: its files})
    that has the framework."""
    workers, candidates = [], {}
    here = os.path.dirname(HERE)
    for framework in ("keras", "pytorch"):
        worker = SaveWorker(framework, megabytes, directory, here)
        workers.append(worker)
        for mode in ("chosen", "page cache"):
            candidates[f"{framework} {mode}"] = (worker, mode)
        for commit, tree in trees.items():
            if os.path.isdir(os.path.join(tree, "candle_ckpt", framework)) or framework == "keras":
                worker = SaveWorker(framework, megabytes, directory, tree)
                workers.append(worker)
                candidates[f"{framework} {commit}"] = (worker, "chosen")
    return workers, candidates


def measure_saves(megabytes, directory, repetitions, trees):
    """{name: [wall seconds]}, {name: [CPU seconds]}, {name: O_DIRECT bytes} and
    {name: state bytes} of whole sync saves (`save_candidates`), interleaved with the
    raw buffered and direct writes of as many bytes as the Keras state."""
    workers, candidates = save_candidates(megabytes, directory, trees)
    size = workers[0].state_bytes
    memory = anonymous_memory(size)
    source = memoryview(memory)[:size]
    source[:] = os.urandom(size)
    path = os.path.join(directory, "raw.h5")
    raw = {
        "raw buffered": lambda: buffered(path, source),
        "raw direct": lambda: through_write_at(path, source),
    }
    names = list(raw) + list(candidates)
    wall, cpu = ({name: [] for name in names} for _ in range(2))
    direct = dict.fromkeys(names)
    try:
        for repetition in range(repetitions + 1):  # the first is a warm-up
            for name in names:
                if name in raw:
                    laid_out(path, size)
                    started, before = time.perf_counter(), cpu_seconds()
                    raw[name]()
                    seconds, used = time.perf_counter() - started, cpu_seconds() - before
                    os.unlink(path)
                    os.sync()
                else:
                    worker, mode = candidates[name]
                    answer = worker.save(mode)
                    seconds, used, direct[name] = (
                        answer["seconds"],
                        answer["cpu"],
                        answer["direct_bytes"],
                    )
                if repetition:
                    wall[name].append(seconds)
                    cpu[name].append(used)
    finally:
        for worker in workers:
            worker.close()
    states = {name: worker.state_bytes for name, (worker, _) in candidates.items()}
    return wall, cpu, direct, states


def report_saves(args, directory):
    commits = [commit for commit in args.against.split(",") if commit]
    trees = {commit: extract_commit(commit) for commit in commits}
    trees = {commit: tree for commit, tree in trees.items() if tree is not None}
    try:
        for megabytes in (int(m) for m in args.megabytes.split(",")):
            wall, cpu, direct, states = measure_saves(megabytes, directory, args.repetitions, trees)
            print(f"{megabytes} MB of state; raw writes of the Keras state's bytes")
            for name in wall:
                note = f", state {states[name] / 1e6:.1f} MB" if name in states else ""
                if direct[name] is not None:
                    note += f", O_DIRECT {direct[name] / 1e6:.1f} MB"
                print(f"  {name:20s} wall {summary(wall[name])}")
                print(f"  {name:20s} CPU  {summary(cpu[name])}{note}")
            pairs = [("raw buffered", "raw direct")]
            for framework in ("keras", "pytorch"):
                others = ["page cache"] + commits
                pairs += [(f"{framework} chosen", f"{framework} {other}") for other in others]
            for ours, theirs in pairs:
                if theirs not in wall:
                    continue
                print(
                    "  " + ratio_line(f"{ours} / {theirs}", wall[ours], wall[theirs]) + ", CPU "
                    f"{statistics.median(cpu[ours]) / statistics.median(cpu[theirs]):.3f}"
                )
    finally:
        for tree in trees.values():
            shutil.rmtree(tree)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", default=None, help="default 100,1000; 100,400 --saves")
    parser.add_argument("--repetitions", type=int, default=None, help="default 5; 7 --saves")
    parser.add_argument("--bounce-mib", type=int, default=None)
    parser.add_argument("--directory", default=None)
    parser.add_argument("--saves", action="store_true", help="whole sync saves (docstring)")
    parser.add_argument("--against", default="48132fc", help="commits to compare, a,b")
    args = parser.parse_args()
    if args.saves:
        args.megabytes = args.megabytes or "100,400"
        args.repetitions = args.repetitions or 7
        header("synchronous saves: O_DIRECT (chosen) against the page cache and older commits")
        directory = scratch_directory(args.directory)
        try:
            report_saves(args, directory)
        finally:
            shutil.rmtree(directory)
        print(f"# load average {os.getloadavg()} at {time.strftime('%H:%M')}")
        return
    args.megabytes = args.megabytes or "100,1000"
    args.repetitions = args.repetitions or 5
    header("O_DIRECT model-file writes against the page cache (write + fsync)")
    directory = scratch_directory(args.directory)
    try:
        for megabytes in (int(m) for m in args.megabytes.split(",")):
            wall, cpu = measure(megabytes, directory, args.repetitions, args.bounce_mib)
            print(f"{megabytes} MB, page-aligned source for direct, +64 bytes for bounce")
            for name in wall:
                print(f"  {name:20s} wall {summary(wall[name])}")
                print(f"  {name:20s} CPU  {summary(cpu[name])}")
            base = statistics.median(wall["buffered+crc32_file"])
            for name in wall:
                print(
                    f"  {name} / buffered+crc32_file: wall ratio "
                    f"{statistics.median(wall[name]) / base:.3f}, CPU/wall "
                    f"{statistics.median(cpu[name]) / statistics.median(wall[name]):.3f}"
                )
            copies = measure_copy(megabytes, 3 * args.repetitions)
            print(f"{megabytes} MB copy into a snapshot")
            for name, seconds in copies.items():
                print(f"  {name:20s} {summary(seconds)}")
            print(
                "  " + ratio_line("copy_into / np.copyto", copies["copy_into"], copies["np_copyto"])
            )
    finally:
        shutil.rmtree(directory)
    load = os.getloadavg()
    print(f"# load average {load} at {time.strftime('%H:%M')}")


if __name__ == "__main__":
    main()
