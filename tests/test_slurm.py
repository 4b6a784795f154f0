"""examples/slurm_job.sh: it finds the project's Python the way sbatch runs it (a fake
sbatch on PATH), and, under a real one-node Slurm started here, a job with a one-minute
limit is stopped before its end, requeued, resumed from `last` and ends with the weights
of an uninterrupted run."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from keras_helpers import assert_same_state, run_job

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
SLURM_JOB = os.path.join(TOP, "examples", "slurm_job.sh")
TINY = ["--n_samples", "512", "--n_features", "16", "--dense", "[32,16]", "--batch_size", "64"]


def executable(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


def fresh_clone(root):
    """The files a clone has that the job needs, and a .venv/bin/python that notes its
    use and runs this interpreter on this tree (the README's setup makes a real one)."""
    (root / "examples").mkdir(parents=True)
    for name in ("slurm_job.sh", "benchmark.py", "candle_params.py", "default_model.txt"):
        shutil.copy(os.path.join(TOP, "examples", name), root / "examples" / name)
    (root / ".venv" / "bin").mkdir(parents=True)
    executable(
        root / ".venv" / "bin" / "python",
        f'#!/bin/sh\necho "$0" >> {root}/venv-used\nPYTHONPATH={TOP} exec {sys.executable} "$@"\n',
    )
    return root


def fake_slurm(bin_dir, spool):
    """An sbatch that runs a copy of the script from a spool directory, in the submit
    directory, as Slurm does (so the script cannot find the repository from $0)."""
    bin_dir.mkdir()
    spool.mkdir()
    executable(
        bin_dir / "sbatch",
        f'#!/bin/sh\ncp "$1" {spool}/slurm_script\nshift\n'
        f'SLURM_SUBMIT_DIR="$PWD" SLURM_JOB_ID=4242 exec bash {spool}/slurm_script "$@"\n',
    )
    executable(bin_dir / "scontrol", f'#!/bin/sh\necho "$@" >> {spool}/scontrol.args\n')
    executable(bin_dir / "python3", "#!/bin/sh\nexit 1\n")  # no candle_ckpt there


def script_env(bin_dir, **extra):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHON", "REPO", "BENCHMARK", "CKPT_DIR") and not key.startswith("SLURM_")
    }
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", **extra}


@pytest.mark.slow
def test_sbatch_from_a_fresh_clone_uses_its_venv_without_python_set(tmp_path):
    repo = fresh_clone(tmp_path / "clone")
    fake_slurm(tmp_path / "bin", tmp_path / "spool")
    result = subprocess.run(
        ["sbatch", "examples/slurm_job.sh", "--epochs", "2", *TINY],
        cwd=repo,
        env=script_env(tmp_path / "bin"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "training exited with status 0" in result.stdout
    assert (repo / "venv-used").read_text() == f"{repo}/.venv/bin/python\n"
    assert os.readlink(repo / "save" / "ckpts" / "last") == "epochs/002"


def test_without_a_python_that_has_candle_ckpt_it_says_in_one_line_what_to_set(tmp_path):
    repo = tmp_path / "clone"
    (repo / "examples").mkdir(parents=True)
    shutil.copy(SLURM_JOB, repo / "examples")
    fake_slurm(tmp_path / "bin", tmp_path / "spool")
    result = subprocess.run(
        ["sbatch", "examples/slurm_job.sh"],
        cwd=repo,
        env=script_env(tmp_path / "bin"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"no Python with candle_ckpt: {repo}/.venv/bin/python does not exist and python3 "
        f"cannot import candle_ckpt; set PYTHON=/path/to/bin/python (or submit from the "
        f"repository's top, or set REPO)\n"
    )
    assert not (repo / "save").exists()


# -- a real Slurm ----------------------------------------------------------------------

SLURM_CONF = """\
ClusterName=candletest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long Slurm holds a requeued job (default 120 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OneNodeSlurm:
    """munged, slurmctld and slurmd of a private cluster whose files are all in `root`
    (its own munge key, socket, ports and slurm.conf); `stop` ends the three daemons by
    the pids they wrote."""

    def __init__(self, root):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
            "SLURM_CONF": os.path.join(root, "slurm.conf"),
        }
        self.pid_files = [
            os.path.join(root, "munge", "munged.pid"),
            os.path.join(root, "slurmctld.pid"),
            os.path.join(root, "slurmd.pid"),
        ]

    def start(self):
        """Start the daemons; return None, or why Slurm cannot run here."""
        munge = os.path.join(self.root, "munge")
        for directory in (
            munge,
            os.path.join(self.root, "state"),
            os.path.join(self.root, "spool"),
        ):
            os.makedirs(directory, mode=0o700)
        key = os.path.join(munge, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as stream:
            stream.write(os.urandom(1024))
        open(os.path.join(self.root, "plugstack.conf"), "w").close()
        with open(self.env["SLURM_CONF"], "w") as stream:
            stream.write(
                SLURM_CONF.format(
                    host=self.host,
                    root=self.root,
                    ctld_port=free_port(),
                    slurmd_port=free_port(),
                    cpus=os.cpu_count() or 1,
                )
            )
        commands = [
            [
                "munged",
                f"--socket={munge}/munge.socket",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
                f"--key-file={key}",
                "--force",
            ],
            ["slurmctld", "-c", "-i"],
            ["slurmd"],
        ]
        for command in commands:
            result = subprocess.run(
                command, env=self.env, capture_output=True, text=True, timeout=60
            )
            if result.returncode != 0:
                return f"{command[0]} failed ({result.returncode}): {result.stderr[-500:]}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T").stdout.strip()
            if state == "idle":
                return None
            time.sleep(0.5)
        return f"the node did not become idle (sinfo: {state!r}); {self.log_tails()}"

    def run(self, *command, cwd=None, env=None):
        return subprocess.run(
            command,
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def wait_for(self, job_id, seconds):
        """Wait until job `job_id` has left the queue; False if it is still there."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-j", job_id, "-o", "%T").stdout.strip():
                return True
            time.sleep(1)
        return False

    def log_tails(self):
        tails = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                tails.append(f"{name}: " + open(path).read()[-1500:])
        return "\n".join(tails)

    def stop(self):
        self.run("scancel", "--full", "--user", "root")
        for pid_file in reversed(self.pid_files):
            try:
                pid = int(open(pid_file).read())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)


def slurm_installed():
    """None if sbatch and the daemons are there (installed now as root if not), else why not."""
    needed = ("sbatch", "squeue", "sinfo", "scontrol", "slurmctld", "slurmd", "munged")
    if all(shutil.which(name) for name in needed):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it (apt-get) needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get"
    install = subprocess.run(
        ["apt-get", "install", "-y", "slurm-wlm", "munge"],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        return f"apt-get install slurm-wlm munge failed: {install.stderr[-500:]}"
    missing = [name for name in needed if not shutil.which(name)]
    return f"still missing after apt-get: {missing}" if missing else None


@pytest.fixture
def slurm():
    if os.geteuid() != 0:
        pytest.skip("a private Slurm needs root (slurmd runs jobs as their user)")
    reason = slurm_installed()
    if reason:
        pytest.skip(reason)
    root = tempfile.mkdtemp(prefix="candle-slurm-")  # short: munge's socket path
    cluster = OneNodeSlurm(root)
    try:
        reason = cluster.start()
        if reason:
            pytest.skip(f"Slurm does not run on this machine: {reason}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# Under the virtual clock (tests/keras_job.py) an epoch "takes" 16 s; the job's end is
# the real one squeue gives (a one-minute limit): each run trains an epoch or two,
# stops with 75 well before Slurm would kill it, and the requeued run goes on.
EPOCHS = ("--epochs", "4", "--ckpt_save_best", "false")
STOPPED = ("--ckpt_walltime_margin", "5", "--virtual_clock", "2")


def run_slurm_job(slurm, tmp_path, options, arguments, script=SLURM_JOB, **env):
    """Submit `script` (examples/slurm_job.sh) with sbatch `options` and the benchmark's
    `arguments` (`env` adds to its environment: BENCHMARK, ...), its tree in
    tmp_path/save; wait until it has left the queue; return (job id, tree, output)."""
    save, output = tmp_path / "save", tmp_path / "job.out"
    env = {"PYTHON": sys.executable, "PYTHONPATH": TOP, "CKPT_DIR": str(save), **env}
    submitted = slurm.run(
        "sbatch",
        "--parsable",
        "--cpus-per-task=1",
        f"--output={output}",
        *options,
        script,
        *arguments,
        cwd=tmp_path,
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    finished = slurm.wait_for(job_id, 400)
    text = output.read_text() if output.exists() else ""
    assert finished, f"job {job_id} still queued:\n{text[-3000:]}\n{slurm.log_tails()}"
    return job_id, save, text


@pytest.mark.slow
def test_real_slurm_job_stops_before_its_limit_requeues_and_resumes_exactly(slurm, tmp_path):
    reference = tmp_path / "reference"
    run_job(reference, *EPOCHS)
    job_id, save, text = run_slurm_job(
        slurm,
        tmp_path,
        ("--time=1", "--signal=B:USR1@5"),
        (*EPOCHS, *STOPPED),
        BENCHMARK=os.path.join(HERE, "keras_job.py"),
        MAX_REQUEUES="8",
    )
    statuses = re.findall(r"training exited with status (\d+)", text)
    assert statuses and statuses[-1] == "0" and set(statuses[:-1]) == {"75"}, text[-3000:]
    assert f"pre-empted: requeueing job {job_id}" in text
    assert "(restart count 1)" in text
    log = (save / "ckpt.log").read_text()
    assert re.search(
        rf"WALL-CLOCK STOP after epoch \d: .*\('squeue -h -j {job_id} -o %L'; "
        rf"\d+ s left\); epoch \d is already on disk; exiting with status 75",
        log,
    )
    assert "restarted from epoch" in log
    assert_same_state(
        reference / "ckpts" / "epochs" / "004" / "model.h5",
        save / "ckpts" / "epochs" / "004" / "model.h5",
    )


# A PyTorch loop with step checkpoints (tests/steps_job.py, 30 batches an epoch) made
# slow (--batch_seconds), so that a signal at a set time finds it inside an epoch.
STEPS_JOB = os.path.join(HERE, "slurm_steps_job.py")
STEPS = ("--epochs", "2", "--ckpt_save_steps", "7")


def uninterrupted_steps_digest(directory):
    """The final digest of an uninterrupted run of steps_job.py with STEPS."""
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "steps_job.py"), str(directory), "2"]
        + ["--ckpt_save_steps", "7"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": TOP, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return re.findall(r"final digest (\w+)", result.stdout)[-1]


def check_resumed_mid_epoch(text, log, signal, expected_digest):
    """Every run but the last exited 75 and the last 0, each stopped by `signal` and
    saving the batch it was at, the first inside an epoch (a later run, on a slow day,
    may be signalled anywhere); together they trained every batch once, in order, and
    the last ends with the uninterrupted run's digest."""
    statuses = re.findall(r"training exited with status (\d+)", text)
    assert len(statuses) >= 2 and statuses[-1] == "0", text[-3000:]
    assert set(statuses[:-1]) == {"75"}, text[-3000:]
    stops = re.findall(rf"PRE-EMPTED by SIG{signal} at the end of epoch (\d), batch (\d+)", log)
    assert len(stops) == len(statuses) - 1, log[-3000:]
    assert 0 < int(stops[0][1]) < 30, stops  # inside an epoch
    trained = re.findall(r"^trained (\d):(\d+)$", text, re.M)
    assert trained == [(str(e), str(b)) for e in (1, 2) for b in range(30)], trained
    assert re.findall(r"final digest (\w+)", text) == [expected_digest]


@pytest.mark.slow
def test_real_slurm_signal_saves_mid_epoch_and_the_requeued_job_ends_bit_identical(slurm, tmp_path):
    """`--signal=B:USR1@30` with a one-minute limit: the signal comes 30 s in, inside
    epoch 2 of a 36-second run; the job saves that batch, exits 75 and requeues itself,
    and the requeued run trains the rest and ends as an uninterrupted run does."""
    expected = uninterrupted_steps_digest(tmp_path / "reference")
    job_id, save, text = run_slurm_job(
        slurm,
        tmp_path,
        ("--time=1", "--signal=B:USR1@30"),
        (*STEPS, "--batch_seconds", "0.6"),
        BENCHMARK=STEPS_JOB,
        OMP_NUM_THREADS="1",
        MAX_REQUEUES="4",
    )
    assert f"pre-empted: requeueing job {job_id}" in text and "(restart count 1)" in text
    check_resumed_mid_epoch(text, (save / "ckpt.log").read_text(), "USR1", expected)


@pytest.mark.slow
def test_real_slurm_sigterm_at_the_time_limit_saves_mid_epoch_and_the_job_ends_bit_identical(
    slurm, tmp_path
):
    """No --signal (clusters without it; the script's #SBATCH --signal line removed): at
    the one-minute limit Slurm sends SIGTERM to every process of the job, and SIGKILL
    after KillWait; with ckpt_signal TERM the job, inside epoch 2 then, saves that batch
    and exits 75, requeues itself (Slurm allows it after the time limit too), and the
    requeued run trains the rest and ends as an uninterrupted run does."""
    expected = uninterrupted_steps_digest(tmp_path / "reference")
    with open(SLURM_JOB) as stream:  # the job script as a cluster without --signal has it
        lines = [line for line in stream if not line.startswith("#SBATCH --signal=")]
    script = tmp_path / "slurm_job_without_signal.sh"
    script.write_text("".join(lines))
    # slurmctld checks time limits every 30 s: SIGTERM comes 60-90 s in, inside
    # epoch 2 (from about 51 s to 99 s)
    job_id, save, text = run_slurm_job(
        slurm,
        tmp_path,
        ("--time=1",),
        (*STEPS, "--batch_seconds", "1.6"),
        script=str(script),
        BENCHMARK=STEPS_JOB,
        OMP_NUM_THREADS="1",
        CKPT_SIGNAL="TERM",
        MAX_REQUEUES="4",
    )
    assert f"JOB {job_id} ON " in text and "DUE TO TIME LIMIT" in text, text[-3000:]
    assert "TERM received: forwarding to" in text and "(restart count 1)" in text
    check_resumed_mid_epoch(text, (save / "ckpt.log").read_text(), "TERM", expected)
