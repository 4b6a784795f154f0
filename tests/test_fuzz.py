"""Damaged, resealed checkpoints (tests/fuzz_restart.py): every restart from one either
loads it or refuses it with exit status 3 and every object exactly as it was. None
crashes, hangs, raises any other exception, or loads part of it.

The default run flips a few hundred bytes within a time budget; `pytest -m soak` runs
thousands. tests/fuzz_corpus holds the damaged files earlier runs failed on.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "fuzz_restart.py")
CORPUS = os.path.join(HERE, "fuzz_corpus")
ENV = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
GOOD = ("loaded", "refused")


def harness(*args, timeout):
    result = subprocess.run(
        [sys.executable, HARNESS, *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def failures(cases):
    return [case for case in cases if case["outcome"] not in GOOD]


def test_a_few_hundred_resealed_byte_flips_load_or_are_refused_whole():
    # 300 cases take about 30 s on an idle 2-core machine; on a loaded one the time
    # budget ends the run first.
    cases = harness("--seed", 2, "--count", 300, "--seconds", 50, timeout=300)
    assert len(cases) >= 50, f"only {len(cases)} cases within the time budget"
    assert not failures(cases), failures(cases)
    assert {case["outcome"] for case in cases} == set(GOOD)


@pytest.fixture(scope="module")
def corpus_outcomes():
    return {case["offset"]: case for case in harness("--corpus", CORPUS, timeout=240)}


@pytest.mark.parametrize("entry", sorted(os.listdir(CORPUS)))
def test_each_corpus_file_loads_or_is_refused_whole(corpus_outcomes, entry):
    case = corpus_outcomes[entry]
    assert case["outcome"] in GOOD, case


@pytest.mark.soak
def test_thousands_of_resealed_byte_flips(tmp_path):
    cases = harness("--seed", os.getpid(), "--count", 4000, "--keep", tmp_path, timeout=7200)
    assert not failures(cases), (failures(cases), sorted(os.listdir(tmp_path)))
