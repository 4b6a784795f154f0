"""The examples as a user runs them (issue 13, frictions 2, 3, 6, 9, 10): the README's
snippets are the quickstart files and resume exactly; the benchmarks show effective
defaults, stop on a refusal with one line and a documented status, hold back
TensorFlow's startup lines and save-and-stop on Ctrl-C."""

import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import flip_byte
from keras_helpers import seeded_state
from keras_job import SMALL

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(TOP, "examples")
ENV = dict(os.environ, PYTHONPATH=TOP, OMP_NUM_THREADS="1")
ENV.pop("CANDLE_CKPT_FAULT", None)
TORCH_SMALL = [*SMALL, "--lr_step", "2"]
BOTH_BENCHMARKS = pytest.mark.parametrize(
    "file, small, framework",
    [("benchmark.py", SMALL, "keras"), ("benchmark_pytorch.py", TORCH_SMALL, "torch")],
)


def run(*command, cwd=TOP, expect=0):
    result = subprocess.run(
        [sys.executable, *map(str, command)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def readme_block(section, language):
    """The first ```language block after the README heading `section`."""
    with open(os.path.join(TOP, "README.md")) as stream:
        text = stream.read()
    start = text.index(f"\n## {section}\n")
    match = re.compile(rf"^```{language}\n(.*?)^```$", re.S | re.M).search(text, start)
    return match.group(1)


@pytest.mark.parametrize(
    "section, file",
    [
        ("Keras quickstart", "quickstart.py"),
        ("PyTorch quickstart", "quickstart_pytorch.py"),
    ],
)
def test_the_readme_snippet_is_the_quickstart_file(section, file):
    with open(os.path.join(EXAMPLES, file)) as stream:
        assert readme_block(section, "python") == stream.read()


@pytest.mark.slow
@pytest.mark.parametrize(
    "file, framework", [("quickstart.py", "keras"), ("quickstart_pytorch.py", "torch")]
)
def test_the_quickstart_resumes_bit_for_bit(tmp_path, file, framework):
    pytest.importorskip(framework)
    first = assert_resumes_bit_for_bit(tmp_path, os.path.join(EXAMPLES, file), framework)
    # the file users copy holds TensorFlow's start-up lines back, as the benchmark does
    assert "absl::InitializeLog" not in first.stderr and "I0000" not in first.stderr
    assert "failed call to cuInit" not in first.stderr or os.path.exists("/dev/nvidia0")


@pytest.mark.slow
def test_the_keras_quickstart_with_shuffle_true_resumes_bit_for_bit(tmp_path):
    """The README's checklist: Keras shuffles NumPy arrays in one seeded order every
    epoch (a new iterator per epoch), so fit(shuffle=True) resumes exactly too."""
    pytest.importorskip("keras")
    with open(os.path.join(EXAMPLES, "quickstart.py")) as stream:
        source = stream.read()
    assert source.count("shuffle=False") == 1
    script = tmp_path / "quickstart_shuffled.py"
    script.write_text(source.replace("shuffle=False", "shuffle=True"))
    assert_resumes_bit_for_bit(tmp_path, script, "keras")


def assert_resumes_bit_for_bit(tmp_path, script, framework):
    """Run `script` for 2 epochs, resume it to 3, and compare epoch 3's state with that
    of an uninterrupted run of 3; return the first run's CompletedProcess."""
    first = run(script, "--epochs", "2", cwd=tmp_path)
    assert "no checkpoint to restart from" in first.stderr
    resumed = run(script, "--epochs", "3", cwd=tmp_path)
    assert "restarted from epoch 2" in resumed.stderr
    run(script, "--epochs", "3", "--ckpt_directory", tmp_path / "whole", cwd=tmp_path)
    tree = "save_quickstart" if framework == "keras" else "save_quickstart_pytorch"
    ours = seeded_state(tmp_path / tree / "ckpts" / "epochs" / "003" / "model.h5", framework)
    theirs = seeded_state(tmp_path / "whole" / "ckpts" / "epochs" / "003" / "model.h5", framework)
    assert sorted(ours) == sorted(theirs) and sum(array.nbytes for array in ours.values()) > 1000
    for name in ours:
        assert ours[name].tobytes() == theirs[name].tobytes(), name
    return first


def test_the_readme_loop_inside_an_epoch_is_the_loader_examples():
    with open(os.path.join(EXAMPLES, "loader_pytorch.py")) as stream:
        assert readme_block("PyTorch: resuming inside an epoch", "python") in stream.read()


@pytest.mark.slow
def test_the_loader_example_killed_inside_an_epoch_resumes_bit_for_bit(tmp_path):
    """Killed once its 4th step checkpoint (every 4 batches: epoch 2's first) is in
    place, rerun: it restarts there and epoch 3 is the uninterrupted run's."""
    pytest.importorskip("torchdata")
    script = os.path.join(EXAMPLES, "loader_pytorch.py")
    killed = subprocess.run(
        [sys.executable, script, "--epochs", "3"],
        capture_output=True,
        env=dict(ENV, CANDLE_CKPT_FAULT="after_step_link:4"),
        cwd=tmp_path,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL
    resumed = run(script, "--epochs", "3", cwd=tmp_path)
    assert "restarted from epoch 2, batch 4" in resumed.stderr
    run(script, "--epochs", "3", "--ckpt_directory", tmp_path / "whole", cwd=tmp_path)
    ours = seeded_state(tmp_path / "save_loader_pytorch/ckpts/epochs/003/model.h5", "torch")
    theirs = seeded_state(tmp_path / "whole/ckpts/epochs/003/model.h5", "torch")
    assert sorted(ours) == sorted(theirs) and sum(array.nbytes for array in ours.values()) > 1000
    for name in ours:
        assert ours[name].tobytes() == theirs[name].tobytes(), name


@pytest.mark.parametrize("file", ["benchmark.py", "benchmark_pytorch.py"])
def test_help_shows_the_parameter_files_defaults(file):
    text = " ".join(run(os.path.join(EXAMPLES, file), "--help").stdout.split())
    assert "--ckpt_keep_limit CKPT_KEEP_LIMIT" in text
    assert "(default: 3)" in text and "1000000" not in text  # the file's, not the table's
    assert "train up to this (1-based) epoch (default: 8)" in text
    assert "--batch_size BATCH_SIZE (default: 64)" in text
    assert "--ckpt_signal {off,USR1,USR2,TERM,INT}" in text
    assert re.search(r"--config_file CONFIG_FILE CANDLE parameter file .*default_model", text)


def usage_error(file, *flags, config=None, cwd=TOP):
    """The one line on stderr of `file` refusing its command line (`config`: the text of
    a parameter file given with --config_file), checked to be all it printed."""
    if config is not None:
        with open(os.path.join(cwd, "params.txt"), "w") as stream:
            stream.write(config)
        flags = ("--config_file", "params.txt", *flags)
    refused = run(os.path.join(EXAMPLES, file), *flags, cwd=cwd, expect=2)
    assert refused.stdout == "" and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"{file}: error: "), refused.stderr
    assert refused.stderr.endswith(f" (see '{file} --help')\n") and "usage:" not in refused.stderr
    return refused.stderr


def default_config(file):
    name = "default_model_pytorch.txt" if "pytorch" in file else "default_model.txt"
    with open(os.path.join(EXAMPLES, name)) as stream:
        return stream.read()


@pytest.mark.parametrize("file", ["benchmark.py", "benchmark_pytorch.py"])
def test_a_bad_flag_value_is_one_line_without_the_usage(file):
    line = usage_error(file, "--ckpt_restart_mode", "sometimes")
    assert (
        "argument --ckpt_restart_mode: parameter 'ckpt_restart_mode': received 'sometimes';" in line
    )
    assert "expected one of ['off', 'auto', 'required']" in line
    assert "invalid int value: 'x'" in usage_error(file, "--epochs", "x")


@pytest.mark.parametrize("file", ["benchmark.py", "benchmark_pytorch.py"])
def test_a_misspelled_flag_gets_the_nearest_one_suggested(file):
    line = usage_error(file, "--ckpt_restart_mdoe", "auto")
    assert "unrecognized arguments: --ckpt_restart_mdoe auto;" in line
    assert "did you mean '--ckpt_restart_mode'?" in line
    assert "did you mean '--ckpt_keep_limit'?" in usage_error(file, "--ckpt_keep_limt=3")
    assert "did you mean" not in usage_error(file, "--frobnicate")


@pytest.mark.parametrize("file", ["benchmark.py", "benchmark_pytorch.py"])
def test_a_bad_value_in_the_parameter_file_names_the_file_and_the_key(file, tmp_path):
    config = default_config(file).replace(
        "ckpt_restart_mode = 'auto'", "ckpt_restart_mode = 'sometimes'"
    )
    line = usage_error(file, config=config, cwd=tmp_path)
    assert "parameter file 'params.txt', key ckpt_restart_mode = 'sometimes': " in line
    assert "expected one of ['off', 'auto', 'required']" in line
    assert "argument --" not in line and "give --ckpt_restart_mode on the command line" in line
    # candle_ckpt's flags check a value of any type, not only a string argparse converts
    config = default_config(file).replace("ckpt_keep_limit = 3", "ckpt_keep_limit = -1")
    line = usage_error(file, config=config, cwd=tmp_path)
    assert "key ckpt_keep_limit = -1: parameter 'ckpt_keep_limit': received -1; expected" in line
    config = default_config(file).replace("ckpt_restart_mode = 'auto'", "ckpt_restart_mode = auto")
    line = usage_error(file, config=config, cwd=tmp_path)
    assert "key ckpt_restart_mode = auto: expected a Python literal" in line
    assert "not found" in usage_error(file, "--config_file", tmp_path / "missing.txt")


def test_the_command_line_overrides_a_bad_value_of_the_parameter_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    import candle_params

    config = tmp_path / "params.txt"
    config.write_text(default_config("benchmark.py").replace("= 'auto'", "= 'sometimes'"))
    params = candle_params.initialize_parameters(
        "test",
        str(config),
        argv=["--ckpt_restart_mode", "off"],
        optimizer="Adam",
        seeded="everything",
    )
    assert params["ckpt_restart_mode"] == "off" and params["ckpt_keep_limit"] == 3


def corrupt_last(root):
    path = os.path.join(root, "ckpts", "last", "model.h5")
    flip_byte(path, os.path.getsize(path) // 2, 0x01)


def error_lines(stderr):
    """stderr without the library's log records: what the example itself printed."""
    return [
        line
        for line in stderr.splitlines()
        if line and not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ candle_ckpt", line)
    ]


@pytest.mark.slow
@BOTH_BENCHMARKS
def test_a_refused_restart_is_one_line_and_status_3(tmp_path, file, small, framework):
    pytest.importorskip(framework)
    script, root = os.path.join(EXAMPLES, file), tmp_path / "save"
    first = run(script, *small, "--epochs", "2", "--ckpt_directory", root)
    assert "absl::InitializeLog" not in first.stderr and "I0000" not in first.stderr
    assert "failed call to cuInit" not in first.stderr or os.path.exists("/dev/nvidia0")
    assert error_lines(first.stderr) == []  # nothing but the library's records
    corrupt_last(root)
    refused = run(script, *small, "--epochs", "3", "--ckpt_directory", root, expect=3)
    lines = error_lines(refused.stderr)
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"{file}: ChecksumMismatchError: checksum mismatch in '")
    assert "--ckpt_restart_fallback true" in lines[0] and "candle-ckpt rollback" in lines[0]
    with open(root / "ckpt.log") as stream:
        assert "RESTART REFUSED: checksum mismatch" in stream.read()
    run(
        script, *small, "--epochs", "3", "--ckpt_directory", root, "--ckpt_restart_fallback", "true"
    )


@pytest.mark.slow
@BOTH_BENCHMARKS
def test_a_ckpt_directory_naming_a_file_is_one_line_and_status_2(tmp_path, file, small, framework):
    pytest.importorskip(framework)
    a_file = tmp_path / "results.csv"
    a_file.write_text("epoch,loss\n")
    refused = run(
        os.path.join(EXAMPLES, file), *small, "--ckpt_directory", a_file, cwd=tmp_path, expect=2
    )
    lines = error_lines(refused.stderr)
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"{file}: ParameterValueError: parameter 'ckpt_directory': ")
    assert f"'{a_file}' is a file, expected a directory" in lines[0]
    assert "Traceback" not in refused.stderr and "epoch 1" not in refused.stdout
    assert a_file.read_text() == "epoch,loss\n" and os.listdir(tmp_path) == ["results.csv"]


@pytest.mark.slow
def test_a_locked_tree_is_status_4_before_anything_is_read(tmp_path):
    pytest.importorskip("keras")
    script, root = os.path.join(EXAMPLES, "benchmark.py"), tmp_path / "save"
    run(script, *SMALL, "--epochs", "1", "--ckpt_directory", root)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom candle_ckpt.core.run.lock import "
            "WriterLock\nfrom candle_ckpt.core.logs import silent_logger\nlock = WriterLock("
            "sys.argv[1], silent_logger())\nlock.acquire()\nprint('locked', flush=True)\n"
            "time.sleep(600)",
            str(root / "ckpts"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        refused = run(script, *SMALL, "--epochs", "2", "--ckpt_directory", root, expect=4)
    finally:
        holder.kill()
        holder.wait()
    assert "restarted from" not in refused.stderr
    lines = error_lines(refused.stderr)
    assert len(lines) == 1 and f"pid {holder.pid} on host" in lines[0], refused.stderr


@pytest.mark.slow
def test_a_mistyped_metric_stops_at_the_first_batch_with_status_2(tmp_path):
    pytest.importorskip("keras")
    script, root = os.path.join(EXAMPLES, "benchmark.py"), tmp_path / "save"
    refused = run(
        script,
        *SMALL,
        "--epochs",
        "2",
        "--ckpt_directory",
        root,
        "--ckpt_save_best_metric",
        "val_mean_absolute_errors",
        expect=2,
    )
    lines = error_lines(refused.stderr)
    assert len(lines) == 1, refused.stderr
    assert "did you mean 'val_mean_absolute_error'?" in lines[0]
    assert "'val_loss'" in lines[0] and "'mean_absolute_error'" in lines[0]
    assert "val_loss:" not in refused.stdout  # no epoch ended
    assert not os.path.exists(root / "ckpts" / "epochs") or not os.listdir(
        root / "ckpts" / "epochs"
    )


@pytest.mark.slow
def test_ctrl_c_saves_and_stops_with_status_75_by_default(tmp_path):
    pytest.importorskip("keras")
    job = [
        sys.executable,
        os.path.join(TOP, "tests", "keras_job.py"),
        "--ckpt_directory",
        str(tmp_path / "save"),
        "--epochs",
        "4",
    ]
    process = subprocess.Popen(
        [*job, "--pause_at", "2:3", "--ckpt_save_interval", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    for line in process.stdout:
        if line.startswith("PAUSED"):
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr and "PRE-EMPTED by SIGINT" in stderr
    assert os.readlink(tmp_path / "save" / "ckpts" / "last") == "epochs/001"
    resumed = subprocess.run(job, capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0 and "restarted from epoch 1" in resumed.stderr
