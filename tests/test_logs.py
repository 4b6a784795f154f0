"""The library's loggers: the console only when asked, one line when ckpt.log fails."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

CODE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="ROOT %(name)s %(message)s")    # as an application does
    from candle_ckpt.core.format.layout import CheckpointLayout
    from candle_ckpt.core.logs import tree_logger
    logger = tree_logger("save", CheckpointLayout(sys.argv[1]), verbose=False)
    for n in range(3):
        logger.info("info record %d", n)
    logger.warning("warning record")
""")


def run(root, prelude=""):
    return subprocess.run(
        [sys.executable, "-c", prelude + CODE, str(root)],
        capture_output=True,
        text=True,
        check=True,
    ).stderr


# Every write to a regular file fails (EFBIG), as on a full disk; pipes (stderr) still work.
NO_FILE_WRITES = textwrap.dedent("""
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
""")


def test_info_stays_off_the_console_when_not_verbose_even_if_the_root_logger_is_set(tmp_path):
    stderr = run(tmp_path / "save")
    assert "info record" not in stderr and "ROOT" not in stderr
    assert stderr.count("warning record") == 1  # once: not also through root
    log = (tmp_path / "save" / "ckpt.log").read_text()
    assert "info record 2" in log and "warning record" in log


def test_a_ckpt_log_that_cannot_be_written_is_one_line_not_a_traceback_per_record(tmp_path):
    root = tmp_path / "save"
    stderr = run(root, prelude=NO_FILE_WRITES)
    assert "Logging error" not in stderr and "Traceback" not in stderr
    assert stderr.count("cannot write") == 1 and "File too large" in stderr
    assert "warning record" in stderr  # the console still has it


FIT_VERBOSE = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    import candle_ckpt
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((24, 4), "float32")
    callback = candle_ckpt.CandleCheckpointCallback(
        {"ckpt_directory": sys.argv[1], "epochs": 2, "ckpt_save_best": False})
    model.fit(x, x[:, :1], batch_size=8, epochs=2, verbose=1, callbacks=[callback])
""")


@pytest.mark.slow
def test_log_lines_start_on_a_fresh_line_under_keras_progress_bar(tmp_path):
    """fit(verbose=1) leaves its bar's line open on stdout while the epoch-end save logs."""
    console = subprocess.run(
        [sys.executable, "-c", FIT_VERBOSE, str(tmp_path / "save")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=300,
        check=True,
    ).stdout
    saved = [line for line in console.split("\n") if "saved (" in line]
    assert len(saved) == 2, console
    for line in saved:  # the record, on its own line: not after "loss: ..." of the bar
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ candle_ckpt.save INFO: epoch", line), (
            repr(line)
        )
    assert console.count("loss:") >= 2  # and the bar is still shown


RESTART_QUIETLY = textwrap.dedent("""
    import logging, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    logging.basicConfig(level=logging.INFO, format="ROOT %(name)s %(message)s")
    import keras, numpy as np
    import candle_ckpt
    params = {"ckpt_directory": sys.argv[1], "epochs": 1, "ckpt_save_best_metric": "loss"}

    def model():
        built = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        built.compile(optimizer="adam", loss="mse")
        return built
    x = np.ones((8, 4), "float32")
    trained = model()
    trained.fit(x, x[:, :1], epochs=1, verbose=0,
                callbacks=[candle_ckpt.CandleCheckpointCallback(params, verbose=False)])
    assert candle_ckpt.restart(params, model(), verbose=False)["epoch"] == 1
""")


@pytest.mark.slow
def test_restart_not_verbose_prints_no_info_with_tensorflow_and_a_root_logger(tmp_path):
    console = subprocess.run(
        [sys.executable, "-c", RESTART_QUIETLY, str(tmp_path / "save")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "candle_ckpt" not in console, console
    log = (tmp_path / "save" / "ckpt.log").read_text()
    assert "epoch 1 saved" in log and "restarted from epoch 1" in log
