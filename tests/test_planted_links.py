"""A tree others can write never makes the library write or delete outside it (issue 32).

For every path the library writes, a symlink to a victim outside the tree is planted in
a finished PyTorch tree (or, for the fd-level guards, while a job runs); then the job
(sync and async), its restart and every operator command run. The victim must stay byte
for byte as it was, and the refusal or warning must name the planted path. In-process,
with tiny PyTorch models; a real subprocess swaps `trash/` for a link while a job runs.
"""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import file_writer

torch = pytest.importorskip("torch")

import candle_ckpt  # noqa: E402
from candle_ckpt.core.errors import UnsafePathError, exit_status  # noqa: E402
from candle_ckpt.core.format import history_cache  # noqa: E402
from candle_ckpt.core.format.layout import CheckpointLayout  # noqa: E402
from candle_ckpt.operator import cli  # noqa: E402

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (path in the tree, whether the victim is a directory)
PLANTED = {
    "trash": ("ckpts/trash", True),
    "work": ("ckpts/work", True),
    "epochs": ("ckpts/epochs", True),
    "an epoch": ("ckpts/epochs/001", True),
    "the next epoch": ("ckpts/epochs/004", True),
    "ckpts": ("ckpts", True),
    ".lock": ("ckpts/.lock", False),
    "history.jsonl": ("ckpts/history.jsonl", False),
    "index.jsonl": ("ckpts/index.jsonl", False),
    "history.cache": ("ckpts/history.cache", False),
    "ckpt.log": ("ckpt.log", False),
}


def train(root, epochs, *, restart=True, **flags):
    """Run (or resume) a tiny PyTorch job on `root` up to `epochs` epochs, keeping one
    epoch of its own, so each save after the first also deletes one."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    params = {"ckpt_directory": str(root), "epochs": epochs, "ckpt_keep_limit": 1, **flags}
    ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
    ckpt.set_model({"model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1)})
    J = ckpt.restart(net, verbose=False) if restart else None
    for epoch in range(J["epoch"] if J else 0, epochs):
        ckpt.ckpt_epoch(epoch, {"val_loss": 1.0 / (epoch + 1)})
    return ckpt


@pytest.fixture(scope="module")
def finished_tree(tmp_path_factory):
    """A tree of 3 epochs (keep all), its history, index and log: last -> 003."""
    root = tmp_path_factory.mktemp("template") / "save"
    train(root, 3, ckpt_keep_mode="all")
    return root


def make_victims(place):
    """A directory and a file the job's user owns, outside the tree."""
    victim_dir = place / "victim_dir"
    (victim_dir / "sub").mkdir(parents=True)
    for name, data in [("model.h5", b"precious h5"), ("notes.txt", b"notes"), ("sub/x", b"x")]:
        (victim_dir / name).write_bytes(data)
    (place / "victim.txt").write_bytes(b"precious text\n")
    return victim_dir, place / "victim.txt"


def snapshot(place):
    """Every entry under `place` (not following links): its kind, mode and bytes."""
    found = {}
    for directory, names, files in os.walk(place):
        for name in names + files:
            path = os.path.join(directory, name)
            status = os.lstat(path)
            data = open(path, "rb").read() if stat.S_ISREG(status.st_mode) else None
            found[os.path.relpath(path, place)] = (
                stat.S_IFMT(status.st_mode),
                status.st_mode,
                data,
            )
    return found


@pytest.fixture
def planted(finished_tree, tmp_path):
    """plant(name) -> (root, planted path, victims' snapshot function): a copy of the
    finished tree with PLANTED[name] replaced by a link to a victim outside it."""

    def plant(name):
        root = tmp_path / "save"
        shutil.copytree(finished_tree, root, symlinks=True)
        victims = tmp_path / "victims"
        victim_dir, victim_file = make_victims(victims)
        relative, is_dir = PLANTED[name]
        path = root / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        os.symlink(victim_dir if is_dir else victim_file, path)
        before = snapshot(victims)
        return root, str(path), lambda: snapshot(victims) == before

    return plant


@pytest.mark.parametrize("name", PLANTED)
@pytest.mark.parametrize("mode", ["restart", "sync", "async"])
def test_a_planted_link_is_refused_by_the_job_and_never_followed(planted, name, mode):
    """restart: the resumed job (refused by its restart); sync/async: a new job
    (restart mode off, refused when it starts writing)."""
    root, path, victims_unchanged = planted(name)
    flags = {} if mode == "restart" else {"ckpt_restart_mode": "off"}
    with pytest.raises(UnsafePathError) as refused:
        train(root, 5, restart=mode == "restart", ckpt_async=mode == "async", **flags)
    message = str(refused.value)
    assert f"'{path}' is a symbolic link to '" in message and "\n" not in message
    assert "Remove it or move it out of the tree" in message
    assert exit_status(refused.value) == 3
    assert victims_unchanged()


OPERATOR_COMMANDS = {
    "list": ["list"],
    "list --verify": ["list", "--verify"],
    "verify": ["verify"],
    "verify --all": ["verify", "--all"],
    "info": ["info"],
    "history": ["history"],
    "plot": ["plot"],
    "export": ["export", "--to", "{out}"],
    "rollback --dry-run": ["rollback", "2", "--dry-run"],
    "prune --dry-run": ["prune", "--keep", "1", "--dry-run"],
    "rollback": ["rollback", "2"],
    "prune": ["prune", "--keep", "1"],
    "prune --abandoned": ["prune", "--abandoned"],
}
CHANGING = {"rollback", "prune", "prune --abandoned"}


@pytest.mark.parametrize("name", PLANTED)
@pytest.mark.parametrize("command", OPERATOR_COMMANDS)
def test_every_command_names_a_planted_link_and_never_follows_it_to_write(
    planted, name, command, capsys, monkeypatch, tmp_path
):
    """Read-only commands warn and read what they safely can; rollback and prune refuse
    (exit 2) before changing anything. `history` would write history.cache here."""
    monkeypatch.setattr(history_cache, "REWRITE_AFTER_BYTES", 1)
    root, path, victims_unchanged = planted(name)
    argv = [part.format(out=tmp_path / "exported.pt") for part in OPERATOR_COMMANDS[command]]
    status = cli.main([argv[0], str(root), *argv[1:]])
    stderr = capsys.readouterr().err
    assert f"'{path}' is a symbolic link to '" in stderr
    if command in CHANGING:
        assert status == 2 and "error:" in stderr and "Remove it" in stderr
    assert victims_unchanged()


def test_read_only_commands_still_read_what_they_safely_can(planted, capsys):
    root, path, _ = planted("trash")
    assert cli.main(["verify", str(root), "--all"]) == 0
    captured = capsys.readouterr()
    assert "epoch 3: ok" in captured.out and f"'{path}'" in captured.err
    assert "warning:" in captured.err


@pytest.mark.parametrize(
    "relative, make, expected",
    [
        ("ckpts/trash", lambda path: path.write_bytes(b""), "a regular file; expected a directory"),
        ("ckpts/history.jsonl", lambda path: path.mkdir(), "a directory; expected a regular file"),
        ("ckpts/epochs/004", lambda path: path.write_bytes(b""), "a regular file; expected a dir"),
    ],
)
def test_a_file_where_a_directory_belongs_and_the_reverse_are_refused(
    finished_tree, tmp_path, relative, make, expected
):
    root = tmp_path / "save"
    shutil.copytree(finished_tree, root, symlinks=True)
    path = root / relative
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    make(path)
    with pytest.raises(UnsafePathError, match=f"'{path}' is {expected}"):
        train(root, 5)


# -- planted while the job runs: the descriptor-level guards --------------------------

MID_RUN = {
    "trash": "ckpts/trash",
    "work": "ckpts/work",
    "epochs": "ckpts/epochs",
    "the next epoch": "ckpts/epochs/003",
    "the epoch to delete": "ckpts/epochs/002",
    "index.jsonl": "ckpts/index.jsonl",
    "history.jsonl": "ckpts/history.jsonl",
}


@pytest.mark.parametrize("name", MID_RUN)
@pytest.mark.parametrize("async_", [False, True], ids=["sync", "async"])
def test_a_link_planted_while_the_job_runs_is_never_followed(tmp_path, name, async_, caplog):
    """After epoch 2's save the link is planted; epoch 3's save (which writes work/,
    renames it into epochs/, appends to the index and the history, and moves epoch 2
    into the trash) refuses it or, for the history, logs the refusal and goes on."""
    root = tmp_path / "save"
    victim_dir, victim_file = make_victims(tmp_path / "victims")
    before = snapshot(tmp_path / "victims")
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    params = {"ckpt_directory": str(root), "epochs": 4, "ckpt_keep_limit": 1, "ckpt_async": async_}
    ckpt = candle_ckpt.CandleCkptPyTorch({**params, "ckpt_save_best": False}, verbose=False)
    ckpt.set_model({"model": net, "optimizer": torch.optim.SGD(net.parameters(), lr=0.1)})
    ckpt.ckpt_epoch(0, {"val_loss": 1.0})
    ckpt.ckpt_epoch(1, {"val_loss": 0.5})
    ckpt.session.checkpointer.background and ckpt.session.checkpointer.background.wait()
    ckpt.session.checkpointer.trash.wait()
    path = root / MID_RUN[name]
    is_file = name.endswith(".jsonl")
    if path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    os.symlink(victim_file if is_file else victim_dir, path)
    try:
        ckpt.ckpt_epoch(2, {"val_loss": 0.25})
        ckpt.ckpt_epoch(3, {"val_loss": 0.125})
    except UnsafePathError as error:
        assert f"'{path}' is " in str(error)
    else:  # what is not on the save's own path is logged, not raised
        assert name == "history.jsonl"
        assert f"'{path}' is a symbolic link" in caplog.text
    ckpt.session.checkpointer.trash.wait()
    assert snapshot(tmp_path / "victims") == before
    if name != "epochs":  # else last names an epoch of the directory moved away
        assert CheckpointLayout(root).resolve_link("last") in (2, 3, 4)


@pytest.mark.parametrize("when", ["before the model is written", "after it is written"])
@pytest.mark.parametrize(
    "replacement, found", [("a link", "a symbolic link to '"), ("a directory", "a directory, not")]
)
def test_work_replaced_while_the_model_is_written_is_refused_before_anything_else(
    make_checkpointer, tmp_path, replacement, found, when
):
    """The model writer is handed `work/` through its descriptor: a link swapped in
    for it, before or after the model is written, is never followed, and once the
    writer returns `work/` must still be the directory the save made, or nothing more
    is written (ckpt-info.json, the index) and nothing is renamed into epochs/."""
    victim_dir, _ = make_victims(tmp_path / "victims")
    before = snapshot(tmp_path / "victims")
    checkpointer = make_checkpointer()
    checkpointer.start_writing()
    layout = checkpointer.layout

    def swap():
        os.rename(layout.work, layout.work + ".moved")
        if replacement == "a link":
            os.symlink(victim_dir, layout.work)
        else:
            os.mkdir(layout.work)

    def swapping_writer(directory):
        if when == "before the model is written":
            swap()
        file_writer()(directory)
        if when == "after it is written":
            swap()
        return "model.h5"

    with pytest.raises(UnsafePathError) as refused:
        checkpointer.epoch_end(1, {"loss": 1.0}, swapping_writer)
    assert f"'{layout.work}' is {found}" in str(refused.value)
    assert not os.path.lexists(layout.epoch_dir(1)) and layout.resolve_link("last") is None
    assert not os.path.exists(os.path.join(layout.ckpts, "index.jsonl"))
    assert snapshot(tmp_path / "victims") == before


# -- a real job while another process swaps a directory for a link ---------------------

JOB = textwrap.dedent("""
    import sys
    from candle_ckpt.core.save.checkpointer import Checkpointer
    sys.path.insert(0, sys.argv[2])
    from conftest import file_writer
    ckpt = Checkpointer({"ckpt_directory": sys.argv[1], "epochs": 400, "ckpt_keep_limit": 1,
                         "ckpt_save_best": False}, verbose=False)
    ckpt.start_writing()
    for epoch in range(1, 401):
        ckpt.epoch_end(epoch, {}, file_writer(b"w" * 4096))
    ckpt.trash.wait()
    ckpt.finish()
""")


def put_back(aside, path):
    """Rename `aside` back to `path`, which the job may have made again meanwhile (then
    what the job put there goes, with its epochs: only the victim matters here)."""
    while True:
        try:
            os.rename(aside, path)
            return
        except OSError:  # not empty: the job is filling it
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("swapped", ["ckpts/trash", "ckpts/epochs"])
def test_a_directory_swapped_for_a_link_while_a_job_runs_is_not_followed(tmp_path, swapped):
    """Another process keeps replacing `swapped` by a link to the victim and putting it
    back, as fast as it can, while a job saves 400 epochs keeping one (each save moves
    an epoch into the trash, and the collector empties it). The job either finishes or
    stops on UnsafePathError naming the path; the victim is never touched."""
    root = tmp_path / "save"
    victim_dir, _ = make_victims(tmp_path / "victims")
    before = snapshot(tmp_path / "victims")
    env = dict(os.environ, PYTHONPATH=TOP)
    job = subprocess.Popen(
        [sys.executable, "-c", JOB, str(root), os.path.join(TOP, "tests")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    path, aside = str(root / swapped), str(root / swapped) + ".aside"
    swaps = 0
    while job.poll() is None:
        try:
            os.rename(path, aside)
        except FileNotFoundError:  # not made yet
            time.sleep(0.001)
            continue
        try:
            os.symlink(victim_dir, path)
            time.sleep(0.0005)
            os.unlink(path)
        except (FileExistsError, IsADirectoryError):  # the job made it again meanwhile
            pass
        put_back(aside, path)
        swaps += 1
    stderr = job.stderr.read()
    assert swaps > 10
    if job.returncode != 0:  # refused, or the directory was away (named either way)
        assert f"'{path}'" in stderr, stderr
    assert snapshot(tmp_path / "victims") == before


# -- the example benchmarks, real jobs --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("async_", ["false", "true"], ids=["sync", "async"])
@pytest.mark.parametrize("example", ["benchmark.py", "benchmark_pytorch.py"])
def test_the_example_benchmark_exits_3_naming_a_planted_trash_link(tmp_path, example, async_):
    """The issue's first row: trash -> a directory made the resumed job delete every
    file in it. Now the job stops before training, exit status 3, naming the link."""
    import keras_job
    import torch_job

    small = keras_job.SMALL if example == "benchmark.py" else torch_job.SMALL
    root = tmp_path / "save"
    command = [sys.executable, os.path.join(TOP, "examples", example), *small]
    flags = ["--ckpt_directory", str(root), "--ckpt_keep_limit", "1", "--ckpt_async", async_]
    env = dict(os.environ, PYTHONPATH=TOP)
    first = subprocess.run([*command, *flags, "--epochs", "2"], env=env, capture_output=True)
    assert first.returncode == 0, first.stderr[-2000:]
    victim_dir, _ = make_victims(tmp_path / "victims")
    before = snapshot(tmp_path / "victims")
    shutil.rmtree(root / "ckpts" / "trash", ignore_errors=True)
    os.symlink(victim_dir, root / "ckpts" / "trash")
    again = subprocess.run(
        [*command, *flags, "--epochs", "4"], env=env, capture_output=True, text=True
    )
    assert again.returncode == 3, again.stderr[-2000:]
    refusal = f"UnsafePathError: '{root}/ckpts/trash' is a symbolic link to '{victim_dir}'"
    assert refusal in again.stderr and "Traceback" not in again.stderr
    assert snapshot(tmp_path / "victims") == before
