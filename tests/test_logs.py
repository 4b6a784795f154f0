"""The library's loggers: the console only when asked, one line when ckpt.log fails."""

import os
import subprocess
import sys
import textwrap

CODE = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="ROOT %(name)s %(message)s")    # as an application does
    from candle_ckpt.core.layout import CheckpointLayout
    from candle_ckpt.core.logs import tree_logger
    logger = tree_logger("save", CheckpointLayout(sys.argv[1]), verbose=False)
    for n in range(3):
        logger.info("info record %d", n)
    logger.warning("warning record")
""")


def run(root):
    return subprocess.run([sys.executable, "-c", CODE, str(root)], capture_output=True,
                          text=True, check=True).stderr


def test_info_stays_off_the_console_when_not_verbose_even_if_the_root_logger_is_set(tmp_path):
    stderr = run(tmp_path / "save")
    assert "info record" not in stderr and "ROOT" not in stderr
    assert stderr.count("warning record") == 1           # once: not also through root
    log = (tmp_path / "save" / "ckpt.log").read_text()
    assert "info record 2" in log and "warning record" in log


def test_a_ckpt_log_that_cannot_be_written_is_one_line_not_a_traceback_per_record(tmp_path):
    root = tmp_path / "save"
    root.mkdir()
    os.symlink("/dev/full", root / "ckpt.log")          # every write: ENOSPC
    stderr = run(root)
    assert "Logging error" not in stderr and "Traceback" not in stderr
    assert stderr.count("cannot write") == 1 and "No space left on device" in stderr
    assert "warning record" in stderr                     # the console still has it
