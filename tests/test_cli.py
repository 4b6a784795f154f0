"""The operator's command line, driven as a subprocess, as an operator would.

The installed `candle-ckpt` console script is used when it sits next to this Python
(a venv with `pip install -e .`), else `python -m candle_ckpt`.
"""

import json
import os
import pty
import subprocess
import sys
import zlib

import pytest
from conftest import as_format1, file_writer, flip_byte
from keras_helpers import run_job

from candle_ckpt.core.format.info import read_info, write_info
from candle_ckpt.core.format.layout import CheckpointLayout
from candle_ckpt.core.save.policies import epochs_to_keep

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "candle-ckpt")
CLI = [SCRIPT] if os.path.exists(SCRIPT) else [sys.executable, "-m", "candle_ckpt"]


def cli(*args, expect=0, cwd=None, env=None):
    """Run candle-ckpt; check the exit status and that errors are one line, no traceback."""
    result = subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )
    assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    if expect == 2:
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("candle-ckpt: error: "), result.stderr
    return result


def run(checkpointer, losses, start=1):
    for epoch, loss in enumerate(losses, start):
        checkpointer.epoch_end(epoch, {"loss": loss}, file_writer(b"epoch %d" % epoch))


@pytest.fixture
def tree(make_checkpointer, ckpt_dir):
    """Epochs 1-5 with loss 3, 1, 2, 0.5, 4: best is 4, last is 5."""
    run(make_checkpointer(epochs=5), [3.0, 1.0, 2.0, 0.5, 4.0])
    return CheckpointLayout(ckpt_dir)


def relink(layout, name, target):
    """What an operator does by hand: ln -sfn TARGET ckpts/NAME."""
    if os.path.lexists(layout.link(name)):
        os.unlink(layout.link(name))
    os.symlink(target, layout.link(name))


def drop_index_lines(layout, epochs):
    """Remove the ckpts/index.jsonl lines of `epochs`: as if a writer without the index
    (format 1, upstream CANDLE) had saved them."""
    path = os.path.join(layout.ckpts, "index.jsonl")
    with open(path) as stream:
        kept = [line for line in stream if json.loads(line)[0] not in epochs]
    with open(path, "w") as stream:
        stream.writelines(kept)


def listing(layout, *options):
    return json.loads(cli("list", layout.root, "--json", *options).stdout)


# -- list -------------------------------------------------------------------------


def test_list_marks_last_best_abandoned_epochs_and_a_leftover_save(tree):
    relink(tree, "last", "epochs/003")  # an operator rolled back by hand
    os.makedirs(tree.work)  # a save was killed
    lines = cli("list", tree.root).stdout.splitlines()
    assert lines[:2] == [tree.root, "last -> epochs/003   best -> epochs/004"]
    assert lines[2].split() == ["epoch", "size", "saved", "at", "loss", "best", "loss", "checksum"]
    rows = {int(line.split()[0]): line.split() for line in lines[3:8]}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert rows[2][1:3] == ["7", "B"] and rows[2][5:] == ["1", "1", "not", "verified"]
    assert rows[3][5:7] == ["2", "1"]  # the epoch's own loss, then the best so far
    assert rows[3][-1] == "last" and rows[4][-2:] == ["best", "abandoned"]
    assert rows[5][-1] == "abandoned" and rows[1][-1] == "verified"
    assert lines[8].startswith("abandoned: epochs 4-5 lie after last")
    assert lines[9].startswith("leftover: ckpts/work/")


def test_list_json_for_scripts(tree):
    relink(tree, "last", "epochs/003")
    found = listing(tree)
    assert found["links"]["last"] == {
        "name": "last",
        "target": "epochs/003",
        "epoch": 3,
        "problem": None,
    }
    assert found["abandoned"] == [4, 5] and found["work"] is False and found["trash"] == []
    epoch_4 = found["epochs"][3]
    assert epoch_4["epoch"] == 4 and epoch_4["best"] and epoch_4["abandoned"]
    assert epoch_4["best_metric_last"] == 0.5 and epoch_4["metric"] == "loss"
    assert epoch_4["size"] == 7 and epoch_4["checksum"] == "not verified"


def test_list_orders_epochs_numerically(make_checkpointer, ckpt_dir):
    checkpointer = make_checkpointer(epochs=1000)
    for epoch in (998, 999, 1000):
        checkpointer.epoch_end(epoch, {"loss": 1.0}, file_writer())
    layout = CheckpointLayout(ckpt_dir)
    assert [row["epoch"] for row in listing(layout)["epochs"]] == [998, 999, 1000]
    rows = cli("list", ckpt_dir).stdout.splitlines()[3:]
    assert [row.split()[0] for row in rows] == ["998", "999", "1000"]


def test_list_reads_no_model_file(tree):
    """Each model.h5 becomes a FIFO: opening one would block the command forever."""
    for epoch in tree.list_epochs():
        model = os.path.join(tree.epoch_dir(epoch), "model.h5")
        os.unlink(model)
        os.mkfifo(model)
    assert len(listing(tree)["epochs"]) == 5


def test_list_verify_validates_and_computes_every_crc32(tree):
    flip_byte(os.path.join(tree.epoch_dir(2), "model.h5"))
    path = os.path.join(tree.epoch_dir(3), "ckpt-info.json")
    info = read_info(tree.epoch_dir(3))
    with open(path, "w") as stream:  # invalid after the head that list reads
        json.dump({**info, "versions": {"x": 1}}, stream)
    result = cli("list", tree.root, "--json", "--verify", expect=1)  # as verify exits
    states = [row["checksum"] for row in json.loads(result.stdout)["epochs"]]
    assert states == ["ok", "BAD: crc32", "BAD: invalid ckpt-info.json", "ok", "ok"]
    assert "BAD: crc32" in cli("list", tree.root, "--verify", expect=1).stdout


def test_list_shows_an_epoch_with_a_broken_info_and_goes_on(tree):
    with open(os.path.join(tree.epoch_dir(2), "ckpt-info.json"), "w") as stream:
        stream.write('{"epoch": 2, "format": ')
    os.unlink(os.path.join(tree.epoch_dir(3), "ckpt-info.json"))
    # The index describes each directory as its save left it: damage inside one after
    # the save is for --verify to find (docs/FORMAT.md, "The list index")...
    rows = {row["epoch"]: row for row in listing(tree)["epochs"]}
    assert [rows[epoch]["problem"] for epoch in (2, 3)] == [None, None]
    verified = json.loads(cli("list", tree.root, "--json", "--verify", expect=1).stdout)
    states = [row["checksum"] for row in verified["epochs"]]
    assert states[1:3] == ["BAD: invalid ckpt-info.json"] * 2
    # ...and without the index, list reads every head
    os.unlink(os.path.join(tree.ckpts, "index.jsonl"))
    rows = {row["epoch"]: row for row in listing(tree)["epochs"]}
    assert "unreadable" in rows[2]["problem"] and "Expecting value" in rows[2]["problem"]
    assert rows[3]["problem"].startswith("no ckpt-info.json")
    assert rows[4]["problem"] is None
    assert "INVALID: no ckpt-info.json" in cli("list", tree.root).stdout


def test_list_of_an_empty_tree(tmp_path):
    os.makedirs(tmp_path / "save" / "ckpts")
    out = cli("list", tmp_path / "save").stdout.splitlines()
    assert out[1:] == ["last: absent   best: absent", "no epochs saved"]


# -- never TensorFlow ---------------------------------------------------------------

GUARD = """
import runpy, sys
sys.argv = ["candle-ckpt"] + sys.argv[1:]
try:
    runpy.run_module("candle_ckpt", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    status = exit.code
heavy = sorted(m for m in ("tensorflow", "keras", "torch", "h5py", "numpy", "jsonschema")
               if m in sys.modules)
print("\\nSTATUS", status, "HEAVY", ",".join(heavy))
"""


@pytest.mark.parametrize(
    "args, allowed",
    [
        (["list"], ""),
        (["list", "--json", "--verify"], "jsonschema"),
        (["info"], "jsonschema"),
        (["verify", "--all"], "jsonschema"),
        (["rollback", "2", "--dry-run"], "jsonschema"),
        (["prune", "--keep", "1", "--dry-run"], ""),
    ],
)
def test_no_command_imports_tensorflow_or_keras(tree, args, allowed):
    where = args[:1] + [tree.root] + args[1:]
    result = subprocess.run(
        [sys.executable, "-c", GUARD, *where], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.splitlines()[-1] == f"STATUS 0 HEAVY {allowed}", result.stderr


# -- info -------------------------------------------------------------------------


def test_info_prints_the_validated_json_of_last_best_or_an_epoch(tree, tmp_path):
    assert json.loads(cli("info", tree.root).stdout) == read_info(tree.epoch_dir(5))
    assert json.loads(cli("info", tree.root, "best").stdout)["epoch"] == 4
    assert json.loads(cli("info", tree.root, "2").stdout)["epoch"] == 2
    # DIR defaults to ./save, and a lone number is an EPOCH
    assert json.loads(cli("info", "3", cwd=tmp_path).stdout)["epoch"] == 3


def test_info_prints_lists_of_numbers_on_one_line(tree):
    write_info(tree.epoch_dir(5), as_format1(read_info(tree.epoch_dir(5)), range(1, 6)))
    lines = cli("info", tree.root).stdout.splitlines()
    assert ' "epochs_saved": [1, 2, 3, 4, 5]' in lines and lines[0] == "{"


def test_list_shows_another_metric_and_names_the_recorded_ones(make_checkpointer, ckpt_dir):
    checkpointer = make_checkpointer(epochs=3)
    for epoch in (1, 2, 3):
        checkpointer.epoch_end(epoch, {"loss": 1.0 / epoch, "acc": epoch / 10}, file_writer())
    rows = listing(CheckpointLayout(ckpt_dir), "--metric", "acc")["epochs"]
    assert [row["value"] for row in rows] == [0.1, 0.2, 0.3]
    assert rows[0]["metrics"] == {"loss": 1.0, "acc": 0.1}
    assert "acc" in cli("list", ckpt_dir, "--metric", "acc").stdout.splitlines()[2]
    error = cli("list", ckpt_dir, "--metric", "val_loss", expect=2).stderr
    assert "'val_loss'" in error and "recorded: acc, loss" in error


def test_a_tree_of_format1_then_format2_epochs_works_in_every_command(tree, tmp_path):
    """Epochs 1-3 as candle_ckpt 0.2 wrote them (format 1), 4-5 format 2."""
    for epoch in (1, 2, 3):
        write_info(
            tree.epoch_dir(epoch), as_format1(read_info(tree.epoch_dir(epoch)), range(1, epoch + 1))
        )
    drop_index_lines(tree, (1, 2, 3))  # a version 1 writer wrote none
    rows = listing(tree)["epochs"]
    assert [row["format_version"] for row in rows] == [1, 1, 1, 2, 2]
    assert [row["value"] for row in rows] == [None, None, None, 0.5, 4.0]
    assert cli("list", tree.root).stdout.splitlines()[3].split()[5] == "-"
    assert cli("info", tree.root, "2").stdout.count('"format_version": 1') == 1
    assert "ok" in cli("verify", tree.root, "--all").stdout
    assert "pointed last -> epochs/002" in cli("rollback", tree.root, "2").stdout
    assert (tree.resolve_link("last"), tree.resolve_link("best")) == (2, 2)
    assert cli("prune", tree.root, "--abandoned").stdout == "deleted 3 epochs: 3-5\n"
    assert cli("prune", tree.root, "--keep", "1").stdout == "deleted 1 epoch: 1\n"


def test_info_of_an_invalid_json_names_the_key(tree):
    path = os.path.join(tree.epoch_dir(5), "ckpt-info.json")
    info = read_info(tree.epoch_dir(5))
    with open(path, "w") as stream:
        json.dump({**info, "epoch_best": "four"}, stream)
    assert "key 'epoch_best' is invalid" in cli("info", tree.root, expect=2).stderr


# -- verify -----------------------------------------------------------------------


def test_verify_an_intact_epoch(tree):
    assert cli("verify", tree.root).stdout == "epoch 5: ok (1 file CRC32-verified)\n"
    assert cli("verify", tree.root, "--all").stdout.count("ok (1 file CRC32-verified)") == 5


def test_verify_reports_a_bit_flip_with_file_expected_and_actual(tree):
    model = os.path.join(tree.epoch_dir(4), "model.h5")
    expected = read_info(tree.epoch_dir(4))["checksum"]
    flip_byte(model)
    actual = str(zlib.crc32(open(model, "rb").read()))
    out = cli("verify", tree.root, "best", expect=1).stdout.splitlines()
    assert out == [
        f"epoch 4: {model}: CRC32 {actual}, ckpt-info.json records {expected}",
        "epoch 4: CORRUPT (1 of 1 file)",
    ]
    assert "epoch 4: CORRUPT" in cli("verify", tree.root, "--all", expect=1).stdout


def test_verify_reports_a_missing_file(tree):
    os.unlink(os.path.join(tree.epoch_dir(5), "model.h5"))
    assert (
        "model.h5: listed in ckpt-info.json but missing"
        in cli("verify", tree.root, expect=1).stdout
    )
    os.unlink(os.path.join(tree.epoch_dir(3), "ckpt-info.json"))
    assert "epoch 3: MISSING" in cli("verify", tree.root, "3", expect=1).stdout


def test_verify_an_invalid_json_is_a_format_error_and_with_all_corrupt(tree):
    with open(os.path.join(tree.epoch_dir(2), "ckpt-info.json"), "w") as stream:
        stream.write("[]")
    assert "top level is a list" in cli("verify", tree.root, "2", expect=2).stderr
    result = cli("verify", tree.root, "--all", expect=1)
    assert result.stdout.count(": ok (") == 4
    assert "epoch 2: CORRUPT: " in result.stdout and "top level is a list" in result.stdout


def test_verify_without_recorded_checksums_checks_sizes(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=1, ckpt_checksum=False), [1.0])
    assert "1 without a recorded CRC32: size checked only" in cli("verify", ckpt_dir).stdout


def test_verify_shows_a_progress_bar_only_on_a_terminal(tree):
    assert cli("verify", tree.root).stderr == ""
    primary, secondary = pty.openpty()
    process = subprocess.run(
        [*CLI, "verify", tree.root], stdout=subprocess.PIPE, stderr=secondary, timeout=120
    )
    os.close(secondary)
    shown = os.read(primary, 4096).decode()
    os.close(primary)
    assert process.returncode == 0 and "model.h5 [" in shown and "7 B / 7 B" in shown


# -- rollback ---------------------------------------------------------------------


def test_rollback_repoints_last_and_the_best_epoch_before_it(tree):
    out = cli("rollback", tree.root, "3").stdout.splitlines()
    assert out == [
        "epoch 3: ok (1 file CRC32-verified)",
        "pointed last -> epochs/003 (was last -> epochs/005)",
        "pointed best -> epochs/002 (was best -> epochs/004): epoch_best "
        "recorded by epoch 3 (loss=1)",
    ]
    assert os.readlink(tree.link("last")) == "epochs/003"  # relative: the tree can move
    assert os.readlink(tree.link("best")) == "epochs/002"
    assert listing(tree)["abandoned"] == [4, 5]
    assert "rollback: last -> epoch 3, best -> epoch 2" in open(tree.log_file).read()
    assert not [name for name in os.listdir(tree.ckpts) if ".tmp." in name]  # no temp link left


def test_rollback_dry_run_changes_nothing(tree):
    out = cli("rollback", tree.root, "1", "--dry-run").stdout
    assert "would point last -> epochs/001" in out and "would point best -> epochs/001" in out
    assert os.readlink(tree.link("last")) == "epochs/005"
    assert os.readlink(tree.link("best")) == "epochs/004"


def test_rollback_refuses_a_corrupt_or_missing_target(tree):
    flip_byte(os.path.join(tree.epoch_dir(2), "model.h5"))
    error = cli("rollback", tree.root, "2", expect=1).stderr
    assert (
        error.startswith(
            "candle-ckpt: error: refusing to roll back to epoch 2, which does not verify:"
        )
        and "CRC32" in error
    )
    assert "epoch 9: " in cli("rollback", tree.root, "9", expect=2).stderr
    assert "epochs on disk: 1-5" in cli("rollback", tree.root, "9", expect=2).stderr
    assert os.readlink(tree.link("last")) == "epochs/005"


def test_rollback_repairs_a_dangling_last(tree):
    os.rename(tree.epoch_dir(5), tree.epoch_dir(5) + ".moved")
    assert "is dangling" in cli("info", tree.root, expect=2).stderr
    assert "is dangling" in cli("verify", tree.root, "last", expect=2).stderr
    cli("rollback", tree.root, "4")
    assert json.loads(cli("info", tree.root).stdout)["epoch"] == 4


# -- prune ------------------------------------------------------------------------


def test_prune_keeps_the_newest_and_never_last_or_best(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=6), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # best is 1
    layout = CheckpointLayout(ckpt_dir)
    assert (
        cli("prune", ckpt_dir, "--keep", "2", "--dry-run").stdout == "would delete 3 epochs: 2-4\n"
    )
    assert layout.list_epochs() == [1, 2, 3, 4, 5, 6]
    assert cli("prune", ckpt_dir, "--keep", "2").stdout == "deleted 3 epochs: 2-4\n"
    assert layout.list_epochs() == [1, 5, 6]
    assert os.listdir(layout.trash) == []
    assert "prune (--keep 2 --mode linear): deleting epochs 2-4" in open(layout.log_file).read()


def test_prune_exponential_across_runs(make_checkpointer, ckpt_dir):
    run(make_checkpointer(epochs=8), [8.0 - e for e in range(8)])
    run(make_checkpointer(epochs=16), [1.0] * 8, start=9)  # a second run, best afresh: 9
    layout = CheckpointLayout(ckpt_dir)
    cli("prune", ckpt_dir, "--keep", "100", "--mode", "exponential")
    assert set(layout.list_epochs()) == epochs_to_keep(range(1, 17), 16, "exponential", 100) | {
        9,
        16,
    }


def test_prune_abandoned_deletes_the_epochs_after_last(tree):
    cli("rollback", tree.root, "2")
    assert cli("prune", tree.root, "--abandoned").stdout == "deleted 3 epochs: 3-5\n"
    assert tree.list_epochs() == [1, 2]


def test_prune_abandoned_keeps_best_even_after_last(tree):
    relink(tree, "last", "epochs/002")  # by hand: best still points at 4
    assert cli("prune", tree.root, "--abandoned").stdout == "deleted 2 epochs: 3, 5\n"
    assert tree.list_epochs() == [1, 2, 4]


def test_prune_refuses_while_a_link_is_dangling(tree):
    relink(tree, "best", "epochs/042")
    assert "refusing to delete anything" in cli("prune", tree.root, "--keep", "1", expect=2).stderr
    assert tree.list_epochs() == [1, 2, 3, 4, 5]


def test_prune_killed_midway_never_leaves_a_half_deleted_epoch(tree):
    env = dict(os.environ, CANDLE_CKPT_FAULT="after_trash_rename:2")
    result = subprocess.run(
        [*CLI, "prune", tree.root, "--keep", "1"], env=env, capture_output=True, timeout=120
    )
    assert result.returncode == -9
    # epoch 1 is gone; epoch 2 is whole, but in trash/, out of every reader's sight
    assert tree.list_epochs() == [3, 4, 5]
    (leftover,) = os.listdir(tree.trash)
    assert leftover.startswith("002.") and sorted(
        os.listdir(os.path.join(tree.trash, leftover))
    ) == ["ckpt-info.json", "model.h5"]
    assert "leftover: ckpts/trash/ holds 1 interrupted deletion" in cli("list", tree.root).stdout
    assert cli("verify", tree.root, "--all").stdout.count(": ok (") == 3


# -- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["list", "{missing}"], "does not exist or is not a directory"),
        (["list", "{tmp}"], "is not a checkpoint tree: it has no 'ckpts/' directory"),
        (["info", "{tree}", "7"], "epoch 7: "),
        (["info", "{tree}", "2", "3"], "expected at most DIR and EPOCH"),
        (["info", "{tree}", "latest"], "EPOCH is 'latest'; expected a number, 'last' or 'best'"),
        (["verify", "{tree}", "2", "--all"], "--all takes no EPOCH"),
        (["rollback", "{tree}"], "expected an EPOCH to roll back to"),
        (["rollback", "{tree}", "last"], "expected an epoch number"),
        (["prune", "{tree}"], "one of the arguments --keep --abandoned is required"),
        (["prune", "{tree}", "--keep", "0"], "--keep is 0; expected an integer >= 1"),
        (["prune", "{tree}", "--keep", "1", "--abandoned"], "not allowed with argument"),
        (["prune", "{tree}", "--abandoned", "--mode", "linear"], "--mode applies to --keep"),
    ],
)
def test_errors_are_one_line_on_stderr_with_status_2(tree, tmp_path, args, message):
    where = {"tree": tree.root, "tmp": tmp_path, "missing": tmp_path / "nowhere"}
    result = cli(*[arg.format(**where) for arg in args], expect=2)
    assert message in result.stderr and result.stdout == ""


def test_best_link_pointing_outside_the_tree_is_refused(tree, tmp_path):
    relink(tree, "best", str(tmp_path))
    assert "outside" in cli("info", tree.root, "best", expect=2).stderr
    assert "outside" in json.dumps(listing(tree)["links"]["best"])


# -- trees from elsewhere ---------------------------------------------------------


def write_upstream_candle_tree(root):
    """What upstream CANDLE leaves: absolute links, 8-key JSON, Infinity, optional CRC."""
    layout = CheckpointLayout(root)
    for epoch, best, checksum in [
        (1, "Infinity", "__DISABLED__"),
        (2, "0.75", None),
        (3, "0.75", None),
        (4, "0.5", None),
    ]:
        directory = layout.epoch_dir(epoch)
        os.makedirs(directory)
        payload = b"candle weights %d" % epoch
        with open(os.path.join(directory, "model.h5"), "wb") as stream:
            stream.write(payload)
        with open(os.path.join(directory, "ckpt-info.json"), "w") as stream:
            stream.write(
                '{"epoch": %d, "save_best_metric": "val_loss", "best_metric_last": %s, '
                '"model_file": "model.h5", "checksum": "%s", "timestamp": '
                '"2021-05-03 10:0%d:00", "time_elapsed": 12.5, "metadata": null}\n'
                % (epoch, best, checksum or zlib.crc32(payload), epoch)
            )
    os.symlink(layout.epoch_dir(4), layout.link("last"))
    os.symlink(layout.epoch_dir(4), layout.link("best"))
    return layout


def test_upstream_candle_tree(tmp_path):
    layout = write_upstream_candle_tree(str(tmp_path / "save"))
    rows = listing(layout)["epochs"]
    assert [(r["best_metric_last"], r["checksum"], r["legacy"], r["size"]) for r in rows] == [
        (None, "off", True, 16),
        (0.75, "not verified", True, 16),
        (0.75, "not verified", True, 16),
        (0.5, "not verified", True, 16),
    ]
    assert json.loads(cli("info", layout.root).stdout)["epoch"] == 4  # an absolute link
    assert json.loads(cli("info", layout.root, "1").stdout)["best_metric_last"] == float("inf")
    assert cli("verify", layout.root, "--all").stdout.count(": ok (") == 4
    assert "1 without a recorded CRC32" in cli("verify", layout.root, "1").stdout
    # best at or before 3: the first epoch that recorded its best value, 0.75
    assert "best -> epochs/002" in cli("rollback", layout.root, "3").stdout
    assert os.readlink(layout.link("last")) == "epochs/003"
    assert "records no best val_loss value" in cli("rollback", layout.root, "1").stdout
    assert not os.path.lexists(layout.link("best"))


def test_tree_written_by_the_keras_callback(tmp_path):
    root = tmp_path / "save"
    run_job(root, "--epochs", "3")
    layout = CheckpointLayout(str(root))
    found = listing(layout)
    assert [row["epoch"] for row in found["epochs"]] == [1, 2, 3]
    assert found["links"]["last"]["epoch"] == 3 and found["epochs"][0]["metric"] == "val_loss"
    assert cli("verify", root, "--all").stdout.count(": ok (1 file CRC32-verified)") == 3
    assert json.loads(cli("info", root, "best").stdout)["model_file"] == "model.h5"
    cli("rollback", root, "2")
    assert cli("prune", root, "--abandoned").stdout == "deleted 1 epoch: 3\n"
    assert json.loads(cli("info", root).stdout)["epoch"] == 2


# -- the benchmark's tree ---------------------------------------------------------


def test_benchmark_tree_is_what_the_library_writes(make_checkpointer, ckpt_dir, tmp_path):
    sys.path.insert(0, os.path.join(HERE, os.pardir, "benchmarks"))
    try:
        import bench_cli_list
    finally:
        sys.path.pop(0)
    bench = bench_cli_list.build_tree(str(tmp_path / "bench"), 30)
    checkpointer = make_checkpointer(epochs=30, ckpt_save_best_metric="val_loss")
    for epoch in range(1, 31):
        checkpointer.epoch_end(
            epoch, {"loss": 1.0, "val_loss": 1.0 / epoch, "accuracy": 0.5}, file_writer()
        )
    real = CheckpointLayout(ckpt_dir)
    for epoch in (1, 30):
        ours, theirs = (read_info(layout.epoch_dir(epoch)) for layout in (bench, real))
        assert list(ours) == list(theirs) and ours["format_version"] == 2
        assert ours["files"] == theirs["files"]
    assert len(listing(bench)["epochs"]) == 30
    shapes = []
    for layout in (bench, real):
        with open(os.path.join(layout.ckpts, "history.jsonl")) as stream:
            shapes.append([(line["kind"], sorted(line)) for line in map(json.loads, stream)])
    assert shapes[0] == shapes[1] and len(shapes[0]) == 61


@pytest.mark.parametrize("command", [("rollback", "2"), ("prune", "--keep", "1")])
def test_rollback_and_prune_refuse_while_a_training_job_writes(tree, command):
    """A running job holds ckpts/.lock: the operator is told who, and nothing changes."""
    from candle_ckpt.core.logs import silent_logger
    from candle_ckpt.core.run.lock import WriterLock

    layout = tree
    before = (layout.list_epochs(), os.readlink(layout.link("last")))
    job = WriterLock(layout.ckpts, silent_logger())
    job.acquire()
    try:
        result = cli(command[0], layout.root, *command[1:], expect=2)
    finally:
        job.release()
    assert f"pid {os.getpid()}" in result.stderr and "held by another writer" in result.stderr
    assert "Run this command between jobs" in result.stderr  # an operator's remedy
    assert "ckpt_directory" not in result.stderr
    assert (layout.list_epochs(), os.readlink(layout.link("last"))) == before
    cli(command[0], layout.root, *command[1:])  # the job has ended: allowed


# -- history and plot -------------------------------------------------------------


@pytest.fixture
def rolled_back(make_checkpointer, ckpt_dir):
    """Epochs 1-6 (loss 6..1), rolled back to 4, then 5-8 again: 2 abandoned epochs."""
    run(make_checkpointer(epochs=8), [6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    layout = CheckpointLayout(ckpt_dir)
    cli("rollback", ckpt_dir, "4")
    checkpointer = make_checkpointer(epochs=8)
    checkpointer.resume(read_info(layout.epoch_dir(4)))
    run(checkpointer, [2.5, 2.0, 1.5, 1.0], start=5)
    return layout


def test_history_table_json_and_csv(rolled_back):
    lines = cli("history", rolled_back.root).stdout.splitlines()
    assert lines[1].split()[:5] == ["epoch", "run", "finished", "(UTC)", "loss"]
    rows = [line.split() for line in lines[2:-1]]
    assert [row[0] for row in rows] == ["1", "2", "3", "4", "5", "6", "5", "6", "7", "8"]
    assert rows[4][-1] == "abandoned" and rows[5][-1] == "abandoned"
    assert rows[-1][-2:] == ["last", "best"]
    assert lines[-1] == (
        "2 runs, 8 epochs on the live timeline, 2 abandoned (runs resumed from epochs 4)"
    )
    found = json.loads(cli("history", rolled_back.root, "--json").stdout)
    assert [e["epoch"] for e in found["epochs"] if not e["abandoned"]] == list(range(1, 9))
    assert found["runs"][1]["resumed_from"] == 4 and found["rewinds"] == [4]
    live = json.loads(cli("history", rolled_back.root, "--json", "--live").stdout)["epochs"]
    assert [e["metrics"]["loss"] for e in live][3:] == [3.0, 2.5, 2.0, 1.5, 1.0]
    csv_lines = cli("history", rolled_back.root, "--csv").stdout.splitlines()
    assert csv_lines[0] == ("epoch,run_id,time,loss,train_seconds,saved,save_seconds,abandoned")
    assert len(csv_lines) == 11 and csv_lines[5].endswith(",1")


def test_history_warns_about_damage_and_goes_on(rolled_back):
    with open(os.path.join(rolled_back.ckpts, "history.jsonl"), "ab") as stream:
        stream.write(b'not json\n{"kind":"epoch"')
    result = cli("history", rolled_back.root)
    assert "candle-ckpt: warning: " in result.stderr and "line 23 is not JSON" in result.stderr
    assert "8 epochs on the live timeline" in result.stdout


def test_history_of_a_tree_without_one(tree):
    os.unlink(os.path.join(tree.ckpts, "history.jsonl"))
    assert "no epoch recorded" in cli("history", tree.root).stdout


def test_plot_draws_a_text_chart_with_marks(rolled_back):
    lines = cli("plot", rolled_back.root).stdout.splitlines()
    assert lines[0] == "loss over epochs 1-8 (8 live, 2 abandoned)"
    chart = "\n".join(lines)
    assert "*" in chart and "x" in chart
    marks = next(line for line in lines if "L" in line and "R" in line).split()
    assert marks == list("sssRsssL")  # saved 1-3, resumed from 4, saved 5-7, last 8


def test_plot_of_a_metric_no_epoch_has_lists_the_metrics(rolled_back):
    error = cli("plot", rolled_back.root, "--metric", "val_loss", expect=2).stderr
    assert "'val_loss'" in error and "recorded metrics: loss" in error


def test_plot_picture(rolled_back, tmp_path):
    for name in ("curves.png", "curves.svg"):
        cli("plot", rolled_back.root, "--out", tmp_path / name)
        assert os.path.getsize(tmp_path / name) > 1000


def test_plot_picture_without_matplotlib_names_the_extra(rolled_back, tmp_path):
    # a matplotlib that fails to import stands in for one not installed
    missing = tmp_path / "without" / "matplotlib"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    path = os.pathsep.join(filter(None, [str(missing.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    error = cli("plot", rolled_back.root, "--out", tmp_path / "x.png", expect=2, env=env).stderr
    assert "candle_ckpt[plot]" in error


def test_after_a_rollback_list_and_history_agree_on_what_is_live(make_checkpointer, ckpt_dir):
    """Issue 30: a run to 60, a run from scratch by mistake to 10, `rollback 60`: `list`
    and `history --live` both say the live timeline ends at epoch 60 of the first run."""
    first = make_checkpointer(epochs=60)
    run(first, [100.0 - epoch for epoch in range(1, 61)])
    run(make_checkpointer(epochs=10, ckpt_restart_mode="off"), [200.0] * 10)
    cli("rollback", ckpt_dir, "60")
    assert json.loads(cli("list", ckpt_dir, "--json").stdout)["links"]["last"]["epoch"] == 60
    live = json.loads(cli("history", ckpt_dir, "--live", "--json").stdout)["epochs"]
    assert [(e["epoch"], e["run_id"]) for e in live] == [(n, first.run_id) for n in range(1, 61)]
    table = cli("history", ckpt_dir, "--live").stdout.splitlines()
    assert table[-2].split()[0] == "60" and table[-2].endswith("last best")
    assert table[-1].startswith("2 runs, 60 epochs on the live timeline, 10 abandoned")


def test_history_marks_epochs_after_last_before_the_next_run(tree):
    cli("rollback", tree.root, "3")
    epochs = json.loads(cli("history", tree.root, "--json").stdout)["epochs"]
    assert [(e["epoch"], e["after_last"]) for e in epochs] == [
        (1, False),
        (2, False),
        (3, False),
        (4, True),
        (5, True),
    ]
    assert (
        "3 epochs on the live timeline, 0 abandoned, 2 after last"
        in cli("history", tree.root).stdout
    )
