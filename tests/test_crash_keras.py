"""kill -9 a real Keras training job, at random instants and at each save-protocol step.

The harness is benchmarks/soak.py (its docstring lists what is checked after every
kill); here it runs a bounded number of kills. `pytest -m soak` runs 500.
"""

import importlib.util
import os

import pytest
from conftest import file_writer

from candle_ckpt.core.storage.durable import temporary_name

pytest.importorskip("keras")

SOAK_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks", "soak.py"
)


def load_soak():
    spec = importlib.util.spec_from_file_location("candle_ckpt_soak", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_killed_between_making_a_temporary_link_and_replacing_last(make_checkpointer):
    """The ~24 us window no random kill hit in the soaks: the next writer removes it."""
    checkpointer = make_checkpointer()
    checkpointer.epoch_end(1, {"loss": 1.0}, file_writer())
    leftover = temporary_name(checkpointer.layout.link("last"))
    os.symlink("epochs/001", leftover)
    resumed = make_checkpointer()
    resumed.start_writing()
    assert not os.path.lexists(leftover)
    assert os.readlink(checkpointer.layout.link("last")) == "epochs/001"


@pytest.mark.slow
def test_killed_at_each_save_step_and_at_random_instants_every_restart_is_good(tmp_path):
    soak = load_soak()
    tally = soak.soak(str(tmp_path), kills=13, seed=5, faults=soak.FAULTS)
    print(tally.summary())
    assert tally.kills == 13 + len(soak.FAULTS)
    assert tally.good_restarts == tally.kills
    assert sorted(tally.by_fault) == sorted(soak.FAULTS)


@pytest.mark.soak
def test_soak_500_kills(tmp_path):
    tally = load_soak().soak(str(tmp_path), kills=500, seed=1)
    print(tally.summary())
    assert tally.good_restarts == tally.kills >= 500
