"""examples/slurm_job.sh: it finds the project's Python the way sbatch runs it (a fake
sbatch on PATH), and, under a real one-node Slurm started here, a job with a one-minute
limit is stopped before its end, requeued, resumed from `last` and ends with the weights
of an uninterrupted run; and a job with step checkpoints, stopped mid-epoch by Slurm's
`--signal` or by the bare SIGTERM of its time limit, resumes at that batch exactly."""

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
# SIGTERM at the time limit, SIGKILL this long after (30 s by default)
KillWait=10
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
            queued = self.run("squeue", "-h", "-j", job_id, "-o", "%T")
            # a busy slurmctld makes squeue time out, with nothing on stdout either
            if queued.returncode == 0 and not queued.stdout.strip():
                return True
            time.sleep(1)
        return False

    def one_minute_job(self, output, script, *args, sbatch_flags=(), cwd, env):
        """Submit `script args` with a one-minute limit and wait until the job has left
        the queue; return (its id, the text of its `output` file)."""
        submitted = self.run(
            "sbatch",
            "--parsable",
            "--time=1",
            "--cpus-per-task=1",
            f"--output={output}",
            *sbatch_flags,
            script,
            *args,
            cwd=cwd,
            env=env,
        )
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip().split(";")[0]
        finished = self.wait_for(job_id, 400)
        text = output.read_text() if output.exists() else ""
        assert finished, f"job {job_id} still queued:\n{text[-3000:]}\n{self.log_tails()}"
        return job_id, text

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


@pytest.mark.slow
def test_real_slurm_job_stops_before_its_limit_requeues_and_resumes_exactly(slurm, tmp_path):
    reference = tmp_path / "reference"
    run_job(reference, *EPOCHS)
    save = tmp_path / "save"
    output = tmp_path / "job.out"
    env = {
        "PYTHON": sys.executable,
        "PYTHONPATH": TOP,
        "CKPT_DIR": str(save),
        "BENCHMARK": os.path.join(HERE, "keras_job.py"),
        "MAX_REQUEUES": "8",
    }
    job_id, text = slurm.one_minute_job(
        output,
        SLURM_JOB,
        *EPOCHS,
        *STOPPED,
        sbatch_flags=["--signal=B:USR1@5"],
        cwd=tmp_path,
        env=env,
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


# -- mid-epoch under a real Slurm -------------------------------------------------------

# tests/steps_job.py trains 3 epochs of 30 batches and waits at PAUSE (epoch 2, batch 10,
# 0-based) until a signal comes: Slurm's, whenever it comes, always at the same batch.
STEPS_EPOCHS, STEPS_BATCHES, PAUSE = 3, 30, (2, 10)
TRAINED = re.compile(r"^trained (\d+):(\d+)$", re.M)
# slurm_job.sh passes flags only; steps_job.py takes its directory and epochs first (the
# --ckpt_directory flag that follows overrides the first).
STEPS_JOB = """\
import sys
sys.path.insert(0, {here!r})
import steps_job
steps_job.main([{directory!r}, "{epochs}", *sys.argv[1:]])
"""


def trained(text):
    return [(int(epoch), int(batch)) for epoch, batch in TRAINED.findall(text)]


def final_digest(text):
    return re.findall(r"^final digest (\w+)$", text, re.M)


def mid_epoch_job(slurm, tmp_path, script, signal_name, *sbatch_flags):
    """Submit `script` (slurm_job.sh) running tests/steps_job.py with ckpt_save_steps and
    ckpt_signal `signal_name`, paused at PAUSE in its first run; wait until it has left
    the queue and return (job id, its output, its checkpoint directory)."""
    save = tmp_path / "save"
    output = tmp_path / "job.out"
    job = tmp_path / "steps_slurm_job.py"
    job.write_text(STEPS_JOB.format(here=HERE, directory=str(save), epochs=STEPS_EPOCHS))
    env = {
        "PYTHON": sys.executable,
        "PYTHONPATH": TOP,
        "OMP_NUM_THREADS": "1",
        "CKPT_DIR": str(save),
        "CKPT_SIGNAL": signal_name,
        "BENCHMARK": str(job),
        "MAX_REQUEUES": "4",
    }
    # The pause is reached in the first run only: the requeued one resumes after it.
    flags = ("--ckpt_save_steps", "1000", "--pause_at", ":".join(map(str, PAUSE)))
    job_id, text = slurm.one_minute_job(
        output, script, *flags, sbatch_flags=sbatch_flags, cwd=tmp_path, env=env
    )
    return job_id, text, save


def assert_resumed_at_the_signalled_batch(job_id, text, save, signal_name, reference):
    """The first run stopped after the paused batch with a step checkpoint of it and
    exit status 75; the requeued run began with the next batch; together they trained
    every batch exactly once and ended with the reference's weights and optimizer."""
    statuses = re.findall(r"training exited with status (\d+)", text)
    assert statuses == ["75", "0"], text[-3000:]
    assert f"pre-empted: requeueing job {job_id}" in text and "(restart count 1)" in text
    first, requeued = text.split("(restart count 1)")
    epoch, batch = PAUSE
    assert trained(first)[-1] == PAUSE and trained(requeued)[0] == (epoch, batch + 1)
    everything = [(e, b) for e in range(1, STEPS_EPOCHS + 1) for b in range(STEPS_BATCHES)]
    assert trained(text) == everything  # none trained again, none skipped
    log = (save / "ckpt.log").read_text()
    assert (
        f"PRE-EMPTED by SIG{signal_name} at the end of epoch {epoch}, batch {batch + 1}: "
        f"training stopped, the epoch resumes after this batch; epoch {epoch}, batch "
        f"{batch + 1} saved now"
    ) in log, log[-3000:]
    step = f"steps/{epoch - 1:03d}.{batch + 1:06d}/model.h5"
    assert re.search(rf"restarted from epoch {epoch}, batch {batch + 1}: .*{step}", log), log
    assert final_digest(text) == [reference]


@pytest.fixture
def steps_reference(tmp_path):
    """The digest of an uninterrupted tests/steps_job.py run (no step saves: they must
    not change training)."""
    directory = str(tmp_path / "reference")
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "steps_job.py"), directory, str(STEPS_EPOCHS)],
        env={**os.environ, "PYTHONPATH": TOP, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return final_digest(done.stdout)[0]


@pytest.mark.slow
def test_real_slurm_signal_saves_mid_epoch_and_the_requeued_run_resumes_at_that_batch(
    slurm, steps_reference, tmp_path
):
    # Slurm sends the signal at its first check (every 30 s) with at most 40 s left:
    # 20 to 50 s after the start, when the first run has long been paused mid-epoch.
    job_id, text, save = mid_epoch_job(slurm, tmp_path, SLURM_JOB, "USR1", "--signal=B:USR1@40")
    assert "USR1 received: forwarding to" in text
    assert_resumed_at_the_signalled_batch(job_id, text, save, "USR1", steps_reference)


@pytest.mark.slow
def test_real_slurm_time_limit_sigterm_saves_mid_epoch_within_killwait_and_resumes(
    slurm, steps_reference, tmp_path
):
    # No --signal (the script's #SBATCH line deleted, as its comment says for such a
    # cluster): at the one-minute limit Slurm sends SIGTERM to the job's processes, and
    # SIGKILL KillWait (10 s) later; the step save fits between the two.
    script = tmp_path / "slurm_job.sh"
    lines = open(SLURM_JOB).read().splitlines(keepends=True)
    script.write_text("".join(line for line in lines if not line.startswith("#SBATCH --signal")))
    job_id, text, save = mid_epoch_job(slurm, tmp_path, script, "TERM")
    assert "CANCELLED AT" in text and "DUE TO TIME LIMIT" in text
    assert "TERM received: forwarding to" in text
    assert_resumed_at_the_signalled_batch(job_id, text, save, "TERM", steps_reference)
