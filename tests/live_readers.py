"""Read-only commands in a loop beside a job that saves and prunes at every epoch.

The soak of tests/test_live_readers.py, also a script to measure for longer::

    python tests/live_readers.py --job keras --seconds 40 [--async] [--corrupt model]

A tree is seeded with two epochs of an earlier run (900 and 901, plain files, links
removed: the job starts afresh and its keep policy never touches another run's epochs),
then a job saves an epoch about every 0.1 s keeping 3 (`--ckpt_keep_limit 3`: one
epoch moves into trash/ at every save) while each read-only command runs in turn, as a
subprocess, for a fixed time. Every run is judged: on a healthy tree any failure is a
false alarm; after `--corrupt` flips a byte of epoch 900's model.h5 (or 901's
ckpt-info.json) halfway through, `list --verify` and `verify --all` must report that
epoch BAD/CORRUPT with exit status 1 (a detection), and nothing else.
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDED = (900, 901)  # the earlier run's epochs; the job never reaches them
VANISHED = 3  # the exit status of a named epoch pruned while it was read (README)

# A job of plain files (conftest.file_writer's kind) saving as fast as the Keras one.
PLAIN_JOB = textwrap.dedent(
    """
    import os, sys, time
    from candle_ckpt.core.save.checkpointer import Checkpointer

    directory, asynchronous = sys.argv[1], sys.argv[2] == "1"
    payload = os.urandom(877_000)
    checkpointer = Checkpointer(
        {"epochs": 800, "ckpt_directory": directory, "ckpt_save_best_metric": "loss",
         "ckpt_keep_limit": 3, "ckpt_async": asynchronous},
        verbose=False,
    )

    def writer(epoch):
        def write_files(target):
            with open(os.path.join(target, "model.h5"), "wb") as stream:
                stream.write(payload[epoch % 97:] + payload[:epoch % 97])
            return "model.h5"
        return write_files

    checkpointer.start_writing()  # ckpts/.lock, as a Keras or PyTorch job takes it
    for epoch in range(1, 800):
        time.sleep(0.08)
        # a new best every fifth epoch: best stays behind last, then is repointed and
        # the epoch it named is pruned at once
        loss = 1000.0 - epoch if epoch % 5 == 0 else 2000.0
        checkpointer.epoch_end(epoch, {"loss": loss}, writer(epoch))
    checkpointer.finish()
    """
)


def seed_tree(directory):
    """Epochs 900 and 901 of an earlier run, as plain files; no links."""
    from candle_ckpt.core.save.checkpointer import Checkpointer

    sys.path.insert(0, HERE)
    from conftest import file_writer

    earlier = Checkpointer(
        {"epochs": 901, "ckpt_directory": directory, "ckpt_save_best_metric": "loss"},
        verbose=False,
    )
    for epoch in SEEDED:
        earlier.epoch_end(epoch, {"loss": 1.0}, file_writer(b"seeded %d" % epoch))
    earlier.finish()
    for name in ("last", "best"):
        os.unlink(os.path.join(directory, "ckpts", name))


def start_job(kind, directory, asynchronous):
    """The job's Popen: the Keras example job (877 kB epochs) or the plain-file one."""
    if kind == "keras":
        command = [
            sys.executable,
            os.path.join(HERE, "keras_job.py"),
            "--ckpt_directory",
            directory,
            "--epochs",
            "800",
            "--n_features",
            "64",
            "--dense",
            "[256,192]",
            "--ckpt_keep_limit",
            "3",
            "--ckpt_save_best_metric",
            "loss",
            "--ckpt_async",
            str(asynchronous).lower(),
        ]
    else:
        command = [sys.executable, "-c", PLAIN_JOB, directory, "1" if asynchronous else "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    # cwd: not a directory holding a candle_ckpt, which `-c` would import before PYTHONPATH's
    return subprocess.Popen(
        command,
        env=env,
        cwd=os.path.dirname(directory),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_epochs(directory, count, job, timeout=120):
    """Wait until the job has saved `count` epochs of its own (beside the seeded ones)."""
    epochs = os.path.join(directory, "ckpts", "epochs")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.poll() is not None:
            raise RuntimeError(f"the job exited early ({job.returncode}): {job.stderr.read()}")
        names = os.listdir(epochs) if os.path.isdir(epochs) else []
        if len([n for n in names if int(n) not in SEEDED]) >= count:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the job saved fewer than {count} epochs in {timeout} s")


def commands(directory, keras, scratch, corrupt):
    """(name, argv) of every command of the loop; `{newest}` is filled in with the job's
    newest epoch at the time of the run (a named epoch soon pruned)."""
    found = [
        ("list", ["list", directory]),
        ("list --json", ["list", directory, "--json"]),
        ("list --verify", ["list", directory, "--verify"]),
        ("verify --all", ["verify", directory, "--all"]),
        ("verify", ["verify", directory]),
        ("verify best", ["verify", directory, "best"]),
        ("verify N", ["verify", directory, "{newest}"]),
        ("info", ["info", directory]),
        ("info N", ["info", directory, "{newest}"]),
        ("history", ["history", directory]),
        ("plot", ["plot", directory]),
    ]
    # the two commands that change a tree refuse while the job holds ckpts/.lock
    found += [
        # to the seeded epoch that stays intact: only the lock can refuse it
        (
            "rollback (refused)",
            ["rollback", directory, str(SEEDED[1] if corrupt == "model" else SEEDED[0])],
        ),
        ("prune (refused)", ["prune", directory, "--keep", "1"]),
    ]
    if keras:
        target = os.path.join(scratch, "exported.weights.h5")
        found += [
            ("export", ["export", directory, "--to", target, "--force"]),
            ("export best", ["export", directory, "best", "--to", target, "--force"]),
        ]
    return found


def newest_epoch(directory):
    names = os.listdir(os.path.join(directory, "ckpts", "epochs"))
    return str(max(int(name) for name in names if int(name) not in SEEDED))


def judge(name, result, corrupted):
    """ "ok", "vanished" (a named epoch pruned meanwhile, exit 3), "detected", or a
    description of what is wrong (a false alarm, or a corruption missed)."""
    out, status = result.stdout + result.stderr, result.returncode
    checks_all = name in ("list --verify", "verify --all")
    if corrupted is not None and checks_all:
        bad = {int(line.split()[0]) for line in result.stdout.splitlines() if " BAD:" in line} | {
            int(line.split()[1].rstrip(":"))
            for line in result.stdout.splitlines()
            if line.startswith("epoch ") and ": CORRUPT" in line
        }
        if status == 1 and bad == {corrupted}:
            return "detected"
        # missed, or reported beside epochs wrongly reported bad
        return f"missed: exit {status}, bad epochs {sorted(bad)}:\n{out}"
    if name.endswith("(refused)"):
        refused = status == 2 and "is held by another writer" in result.stderr
        return "ok" if refused else f"not refused: exit {status}:\n{out}"
    if name.endswith(" N") and len(result.stderr.splitlines()) == 1:
        if status == VANISHED:
            return "vanished"  # pruned while it was read
        if status == 2 and "does not exist; epochs on disk" in result.stderr:
            return "vanished"  # pruned between the choice of the epoch and the command
    if status != 0:
        return f"exit {status}:\n{out}"
    if result.stderr.strip():
        return f"stderr:\n{out}"
    if name == "list --json":
        listing = json.loads(result.stdout)
        problems = [
            e
            for e in listing["epochs"]
            if (e["problem"] or e["checksum"] == "BAD") and e["epoch"] != corrupted
        ]
        problems += [link for link in listing["links"].values() if link["problem"]]
        if problems:
            return f"problems: {problems}"
        return "ok"
    # `list` summarises the corrupted ckpt-info.json: INVALID, rightly
    reported = [
        line
        for line in out.splitlines()
        if any(word in line for word in ("INVALID", "BAD", "dangling", "CORRUPT"))
        and not (corrupted is not None and line.split()[0] == str(corrupted))
    ]
    return f"reported:\n{out}" if reported else "ok"


def flipped(corrupt):
    """(file name, epoch) that `flip` changes for `corrupt`."""
    return ("model.h5", SEEDED[0]) if corrupt == "model" else ("ckpt-info.json", SEEDED[1])


def flip(directory, corrupt):
    """Flip a byte of seeded epoch 900's model.h5 ("model") or 901's ckpt-info.json
    ("info"), in place; returns the epoch."""
    name, epoch = flipped(corrupt)
    with open(os.path.join(directory, "ckpts", "epochs", "%03d" % epoch, name), "r+b") as f:
        f.seek(3)
        byte = f.read(1)[0]
        f.seek(3)
        f.write(bytes([byte ^ 0x01]))
    return epoch


def soak(directory, scratch, job, seconds, asynchronous=False, corrupt=None, only=None):
    """Run the soak (module docstring), of the commands named in `only` if given;
    returns {"runs", "false_alarms", "detections", "missed", "vanished",
    "after_corruption", "saved": epochs, "runs_by_command", "failures": [(command, what)]}."""
    seed_tree(directory)
    process = start_job(job, directory, asynchronous)
    counts = {"runs": 0, "false_alarms": 0, "detections": 0, "vanished": 0}
    counts["after_corruption"] = counts["missed"] = 0
    failures, per_command = [], {}
    try:
        wait_for_epochs(directory, 4, process)
        loop = commands(directory, job == "keras", scratch, corrupt)
        loop = [(name, argv) for name, argv in loop if only is None or name in only]
        started = time.monotonic()
        corrupted = None
        while True:
            # whole rounds of the loop: at least one after the flip, however slow
            elapsed = time.monotonic() - started
            if corrupt and corrupted is None and elapsed > seconds / 2:
                corrupted = flip(directory, corrupt)
            elif elapsed >= seconds:
                break
            for name, argv in loop:
                argv = [newest_epoch(directory) if a == "{newest}" else a for a in argv]
                result = subprocess.run(
                    [sys.executable, "-m", "candle_ckpt", *argv],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    cwd=scratch,  # as the job's: PYTHONPATH says which candle_ckpt runs
                )
                verdict = judge(name, result, corrupted)
                counts["runs"] += 1
                per_command[name] = per_command.get(name, 0) + 1
                if corrupted is not None and name in ("list --verify", "verify --all"):
                    counts["after_corruption"] += 1
                if verdict == "detected":
                    counts["detections"] += 1
                elif verdict == "vanished":
                    counts["vanished"] += 1
                elif verdict.startswith("missed"):
                    counts["missed"] += 1
                    failures.append((name, verdict))
                elif verdict != "ok":
                    counts["false_alarms"] += 1
                    failures.append((name, verdict))
        if process.poll() is not None:
            raise RuntimeError(f"the job ended during the soak: {process.stderr.read()}")
    finally:
        process.kill()
        process.wait()
    names = os.listdir(os.path.join(directory, "ckpts", "epochs"))
    counts["saved"] = max(int(n) for n in names if int(n) not in SEEDED)
    return {**counts, "runs_by_command": per_command, "failures": failures}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", choices=("keras", "plain"), default="keras")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--async", dest="asynchronous", action="store_true")
    parser.add_argument("--corrupt", choices=("model", "info"))
    parser.add_argument("--show", type=int, default=5, help="failures to print")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="only this command (repeatable)"
    )
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        outcome = soak(
            os.path.join(scratch, "save"),
            scratch,
            args.job,
            args.seconds,
            args.asynchronous,
            args.corrupt,
            args.only,
        )
    by_command = {}
    for name, _ in outcome["failures"]:
        by_command[name] = by_command.get(name, 0) + 1
    for name, what in outcome["failures"][: args.show]:
        print(f"--- {name}: {what}")
    print(json.dumps({k: v for k, v in outcome.items() if k != "failures"}))
    print("false alarms by command:", json.dumps(by_command))


if __name__ == "__main__":
    main()
