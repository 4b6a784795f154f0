"""kill -9 a real PyTorch training job at random instants and at each save-protocol step.

The harness is benchmarks/soak.py (what is checked after every kill: its docstring),
run on tests/torch_job.py with a model of about 13 MB of state (AdamW)."""

import os

import pytest
from test_crash_keras import load_soak

pytest.importorskip("torch")

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_job.py")
MODEL = [
    "--n_features",
    "64",
    "--dense",
    "[1024,1024]",
    "--n_samples",
    "512",
    "--batch_size",
    "64",
    "--ckpt_keep_limit",
    "2",
]


@pytest.mark.slow
def test_killed_at_each_save_step_and_at_random_instants_every_restart_is_good(tmp_path):
    soak = load_soak()
    # Every protocol point, during_direct_write included (the torch format writes its
    # large tensors through core/storage/direct_io). The first kill is at the second save (epoch
    # 1 complete), as in soak.FAULTS.
    from candle_ckpt.core.storage.faults import POINTS

    faults = (f"{POINTS[0]}:2",) + tuple(f"{point}:1" for point in POINTS[1:])
    tally = soak.soak(
        str(tmp_path), kills=6, seed=3, faults=faults, job=(JOB, *MODEL), max_delay=2.0
    )
    print(tally.summary())
    assert tally.kills == 6 + len(faults)
    assert tally.good_restarts == tally.kills
    assert sorted(tally.by_fault) == sorted(faults)
