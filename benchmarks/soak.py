"""kill -9 soak: SIGKILL a real Keras training job at random instants, check every restart.

    PYTHONPATH=. python benchmarks/soak.py --kills 500 [--seed 1] [--workdir /tmp/soak]

Each trial trains the example benchmark (tests/keras_job.py) with a model whose state is
about 52 MB (Dense 64-2048-2048-1 with Adam), so that a save takes a good share of each
epoch, into a fresh tree, with `--ckpt_keep_limit 2` so that pruning runs as well. The
job is killed with SIGKILL at a random instant after its restart, then restarted, until a
run reaches the target epoch; then the next trial starts. Kills may also be aimed at a
named step of the save protocol (`CANDLE_CKPT_FAULT`, candle_ckpt/faults.py).

After every kill, without TensorFlow, `check_tree` asserts:
- `restart` with `ckpt_restart_mode=auto` finds a checkpoint or none, and never fails;
  when `last` exists, its epoch never goes backwards and its CRC32s verify;
- every directory in `epochs/` is a complete epoch: valid ckpt-info.json, every file
  present with its recorded size and CRC32 (a temp directory is never an epoch);
- `candle-ckpt list` shows every epoch from the list index exactly as from its
  ckpt-info.json;
- nothing else in `ckpts/` but work/, trash/, the links, the lock, the history, the list
  index and temporary `.NAME.tmp.*` names.
The next run (a new process) must log "restarted from epoch N" with N the epoch of
`last` (its weights and optimizer state load), or start from scratch when there is none.
When a run finishes, `last` is the target epoch and no work/, trash entry or temporary
name is left. Prints "N kills, N good restarts" and exits 1 on any failure.
"""

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
JOB = os.path.join(TOP, "tests", "keras_job.py")
MODEL = [
    "--n_features",
    "64",
    "--dense",
    "[2048,2048]",
    "--n_samples",
    "256",
    "--batch_size",
    "128",
    "--ckpt_keep_limit",
    "2",
]
STARTED = re.compile(r"restarted from epoch (\d+)|no checkpoint to restart from")
sys.path.insert(0, TOP)

from candle_ckpt.core.errors import CheckpointError  # noqa: E402
from candle_ckpt.core.format.info import read_info  # noqa: E402
from candle_ckpt.core.format.layout import (  # noqa: E402  # noqa: E402
    CACHE_FILE,
    HISTORY_FILE,
    INDEX_FILE,
    CheckpointLayout,
    parse_epoch_dirname,
)
from candle_ckpt.core.logs import silent_logger  # noqa: E402
from candle_ckpt.core.params import validate_params  # noqa: E402
from candle_ckpt.core.restore.resume import find_checkpoint  # noqa: E402
from candle_ckpt.core.restore.verify import verify_files  # noqa: E402
from candle_ckpt.core.storage.durable import is_temporary_name  # noqa: E402
from candle_ckpt.core.storage.faults import POINTS  # noqa: E402
from candle_ckpt.operator.inventory import survey  # noqa: E402

# Every fault point of candle_ckpt.core.storage.faults, for consecutive lives of one trial:
# the first is killed saving epoch 2 (epoch 1 is complete), each later one at its first save.
# after_trash_rename comes after after_last, whose kill leaves no work/ to delete, so it
# stops the keep policy's deletion.
FAULTS = (f"{POINTS[0]}:2",) + tuple(f"{point}:1" for point in POINTS[1:])
_KNOWN = {"epochs", "work", "trash", "last", "best", ".lock", HISTORY_FILE, INDEX_FILE, CACHE_FILE}


class SoakFailure(AssertionError):
    """A checkpoint tree broke an invariant after a kill."""


@dataclass
class Tally:
    """What a soak did: kills, verified restarts, and where the kills landed."""

    kills: int = 0
    good_restarts: int = 0
    trials: int = 0
    left_work: int = 0
    left_trash: int = 0
    left_temporary: int = 0
    by_fault: dict = field(default_factory=dict)

    def summary(self):
        return (
            f"{self.kills} kills, {self.good_restarts} good restarts "
            f"({self.trials} trials to the target epoch; kills that left work/: "
            f"{self.left_work}, trash/: {self.left_trash}, a temporary link or file: "
            f"{self.left_temporary}; aimed at protocol steps: {self.by_fault or 'none'})"
        )


def check_tree(root, previous_last):
    """Assert the invariants of a tree after a kill; return (last epoch or None, leftovers)."""
    layout = CheckpointLayout(root)
    settings = validate_params({"ckpt_directory": root, "ckpt_restart_mode": "auto"})
    try:
        found = find_checkpoint(layout, settings, silent_logger())
    except CheckpointError as error:
        raise SoakFailure(f"{root}: restart(mode=auto) would fail: {error}") from error
    last = found.epoch if found else None
    if previous_last is not None and (last is None or last < previous_last):
        raise SoakFailure(f"{root}: last went back from epoch {previous_last} to {last}")
    epochs_dir = layout.epochs
    for name in sorted(os.listdir(epochs_dir)) if os.path.isdir(epochs_dir) else []:
        epoch = parse_epoch_dirname(name)
        if epoch is None:
            raise SoakFailure(f"{epochs_dir}: '{name}' is not an epoch directory name")
        directory = layout.epoch_dir(epoch)
        try:
            verify_files(directory, read_info(directory))
        except (CheckpointError, OSError) as error:
            raise SoakFailure(f"{directory} is in epochs/ but incomplete: {error}") from error
    if os.path.isdir(layout.ckpts):
        # `list` with the index shows what it shows without (docs/FORMAT.md)
        with_index, without = survey(layout), survey(layout, use_index=False)
        for cached, read in zip(with_index.epochs, without.epochs):
            if _summary(cached) != _summary(read):
                raise SoakFailure(
                    f"{root}: list shows epoch {read.epoch} from ckpts/{INDEX_FILE} as "
                    f"{_summary(cached)}; its ckpt-info.json says {_summary(read)}"
                )
        if len(with_index.epochs) != len(without.epochs):
            raise SoakFailure(f"{root}: list shows other epochs with ckpts/{INDEX_FILE}")
    leftovers = set()
    for name in os.listdir(layout.ckpts) if os.path.isdir(layout.ckpts) else []:
        if is_temporary_name(name):
            leftovers.add("temporary")
        elif name not in _KNOWN:
            raise SoakFailure(f"{layout.ckpts}: unexpected entry '{name}'")
    if os.path.lexists(layout.work):
        leftovers.add("work")
    if os.path.isdir(layout.trash) and os.listdir(layout.trash):
        leftovers.add("trash")
    return last, leftovers


def _summary(summary):
    return {name: getattr(summary, name) for name in summary.__slots__}


def check_finished(root, target):
    """After a run that exited normally: `last` is the target and nothing is left over."""
    last, leftovers = check_tree(root, None)
    if last != target:
        raise SoakFailure(f"{root}: the finished run left last at epoch {last}; expected {target}")
    if leftovers:
        raise SoakFailure(f"{root}: the finished run left {sorted(leftovers)} behind")


def start_job(root, target, log_path, fault=None, job=(JOB, *MODEL)):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (TOP, os.environ.get("PYTHONPATH")) if p)
    )
    env.pop("CANDLE_CKPT_FAULT", None)
    if fault:
        env["CANDLE_CKPT_FAULT"] = fault
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, job[0], "--ckpt_directory", root, "--epochs", str(target), *job[1:]],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    log.close()
    return process


def wait_started(process, log_path, timeout=180):
    """Wait until the job has logged its restart; return the epoch it restarted from."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as stream:
            match = STARTED.search(stream.read())
        if match:
            return int(match.group(1)) if match.group(1) else None
        if process.poll() is not None:
            raise SoakFailure(
                f"the job exited with {process.returncode} before restarting:\n"
                + open(log_path, errors="replace").read()[-3000:]
            )
        time.sleep(0.01)
    process.kill()
    raise SoakFailure(f"the job did not restart within {timeout} s")


def run_one_life(root, target, log_path, kill_after, fault, tally, after_kill, job):
    """Start the job, kill it (after `kill_after` s, or at `fault`), check the tree.

    With neither, the job must run to the end. `after_kill`: the previous life was
    killed, so this restart counts as a checked one. Returns True when the job finished.
    """
    expected = check_tree(root, None)[0]
    process = start_job(root, target, log_path, fault, job)
    restarted = wait_started(process, log_path)
    if restarted != expected:
        raise SoakFailure(f"{root}: the job restarted from {restarted}, last is {expected}")
    if after_kill:
        tally.good_restarts += 1  # verified and loaded into a new process's model
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    code = process.wait(timeout=600)
    if code == 0 and fault:
        raise SoakFailure(
            f"the job with CANDLE_CKPT_FAULT={fault} finished: the fault point was never reached"
        )
    if code == 0:
        check_finished(root, target)
        return True
    if code != -signal.SIGKILL or (kill_after is None and fault is None):
        raise SoakFailure(
            f"the job failed with exit code {code}:\n"
            + open(log_path, errors="replace").read()[-3000:]
        )
    tally.kills += 1
    if fault:
        tally.by_fault[fault] = tally.by_fault.get(fault, 0) + 1
    _, leftovers = check_tree(root, expected)
    tally.left_work += "work" in leftovers
    tally.left_trash += "trash" in leftovers
    tally.left_temporary += "temporary" in leftovers
    return False


def soak(
    workdir, kills, seed=0, target=3, max_delay=4.0, faults=(), progress=None, job=(JOB, *MODEL)
):
    """Kill jobs `kills` times at random instants and once at each of `faults`.

    Each trial trains a fresh tree: the first one's lives are killed at each of `faults`
    in turn, then lives are killed at random instants while kills remain; the last life
    of a trial runs to the end. Every life after a kill checks the restart.

    Args:
        workdir: where the trees are made (each trial's tree is removed when it passes).
        kills: how many random-instant kills.
        seed: of the random kill instants.
        target: the epoch each trial trains to (plus one per fault for the first).
        max_delay: kill instants are uniform in [0, max_delay] s after the restart.
        faults: CANDLE_CKPT_FAULT values, one life each.
        progress: optional callable(Tally) after each life.
        job: the training script and its arguments (default: the Keras job above;
            tests/test_crash_pytorch.py runs tests/torch_job.py).

    Returns:
        The Tally. Raises SoakFailure at the first broken invariant (the tree is kept).
    """
    rng, tally = random.Random(seed), Tally()
    log_path = os.path.join(workdir, "job.log")
    pending, random_kills = list(faults), 0
    while pending or random_kills < kills:
        root = os.path.join(workdir, f"trial{tally.trials:04d}")
        trial_target, after_kill = target + len(pending), False
        while True:
            fault = pending.pop(0) if pending else None
            kill_after = None
            if fault is None and random_kills < kills:
                kill_after = rng.uniform(0, max_delay)
            finished = run_one_life(
                root, trial_target, log_path, kill_after, fault, tally, after_kill, job
            )
            random_kills += kill_after is not None and not finished
            if progress:
                progress(tally)
            if finished:
                break
            after_kill = True
        shutil.rmtree(root)
        tally.trials += 1
    return tally


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=500, help="random-instant kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="default: a fresh temp directory")
    parser.add_argument(
        "--faults",
        action="store_true",
        help="also one kill at each fault point of candle_ckpt.core.storage.faults",
    )
    args = parser.parse_args(argv)
    import tempfile

    workdir = args.workdir or tempfile.mkdtemp(prefix="candle_ckpt_soak_")
    os.makedirs(workdir, exist_ok=True)
    faults = FAULTS if args.faults else ()
    started = time.time()

    def progress(tally):
        print(
            f"\r{tally.kills} kills, {tally.good_restarts} good restarts, "
            f"{time.time() - started:.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )

    try:
        tally = soak(workdir, args.kills, args.seed, faults=faults, progress=progress)
    except SoakFailure as failure:
        print(f"\nFAILED: {failure}", file=sys.stderr)
        return 1
    print(
        f"\n{tally.summary()} in {time.time() - started:.0f} s; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(f"command: PYTHONPATH=. python benchmarks/soak.py {' '.join(argv or sys.argv[1:])}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
