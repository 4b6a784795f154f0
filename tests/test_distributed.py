"""Which process writes: explicit is_writer, strategy, TF_CONFIG, MPI/Slurm ranks; a
non-writer leaves no trace in the tree; workers that disagree on `last` fail loudly."""

import json
import os

import pytest

from candle_ckpt.core.errors import CheckpointError
from candle_ckpt.core.run.writer import agree_on_checkpoint, writer_decision


def tf_config(task_type, index, chief=False):
    cluster = {"worker": ["localhost:1", "localhost:2"]}
    if chief:
        cluster["chief"] = ["localhost:0"]
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize(
    "environ,expected",
    [
        ({}, True),
        ({"TF_CONFIG": tf_config("chief", 0, chief=True)}, True),
        ({"TF_CONFIG": tf_config("worker", 0, chief=True)}, False),
        ({"TF_CONFIG": tf_config("worker", 0)}, True),
        ({"TF_CONFIG": tf_config("worker", 1)}, False),
        ({"TF_CONFIG": tf_config("evaluator", 0)}, False),
        ({"OMPI_COMM_WORLD_RANK": "0"}, True),
        ({"PMI_RANK": "3"}, False),
        ({"SLURM_PROCID": "1"}, False),
        ({"OMPI_COMM_WORLD_RANK": "0", "SLURM_PROCID": "5"}, True),  # MPI rank first
        ({"TF_CONFIG": tf_config("worker", 1), "SLURM_PROCID": "0"}, False),  # TF_CONFIG first
    ],
    ids=[
        "single",
        "chief",
        "worker0-with-chief",
        "worker0",
        "worker1",
        "evaluator",
        "ompi0",
        "pmi3",
        "slurm1",
        "ompi-before-slurm",
        "tfconfig-before-slurm",
    ],
)
def test_detection_order(environ, expected):
    assert writer_decision(None, None, environ).is_writer is expected


def test_explicit_is_writer_wins_over_the_environment():
    decision = writer_decision(False, None, {})
    assert not decision.is_writer and "given by the caller" in decision.reason
    assert writer_decision(True, None, {"SLURM_PROCID": "1"}).is_writer


class FakeStrategy:
    """What keras.distributed.strategy_decision reads of a MultiWorkerMirroredStrategy."""

    def __init__(self, chief):
        self.extended = type("Extended", (), {"should_checkpoint": chief})()
        spec = type("Spec", (), {"jobs": ["worker"]})()
        self.cluster_resolver = type("Resolver", (), {"cluster_spec": lambda _: spec})()


@pytest.mark.parametrize("chief", [True, False])
def test_a_multi_worker_strategy_comes_before_the_rank_variables(chief):
    from candle_ckpt.keras.distributed import strategy_decision

    model = type("Model", (), {"distribute_strategy": FakeStrategy(chief)})()
    decision = writer_decision(
        None, strategy_decision(model), {"SLURM_PROCID": "0" if not chief else "1"}
    )
    assert decision.is_writer is chief and "should_checkpoint" in decision.reason


@pytest.mark.parametrize(
    "environ,named",
    [
        ({"TF_CONFIG": "{not json"}, "TF_CONFIG"),
        ({"TF_CONFIG": json.dumps({"cluster": {}})}, "TF_CONFIG"),
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID"),
        ({"PMI_RANK": "-1"}, "PMI_RANK"),
    ],
)
def test_malformed_environment_is_an_error_naming_the_variable(environ, named):
    with pytest.raises(ValueError, match=named):
        writer_decision(None, None, environ)


def test_is_writer_must_be_a_bool():
    with pytest.raises(TypeError, match=r"'is_writer': received 'yes'"):
        writer_decision("yes", None, {})


def test_without_a_strategy_agreement_is_the_local_search():
    assert agree_on_checkpoint(None, lambda: None) is None
    with pytest.raises(CheckpointError, match="boom"):
        agree_on_checkpoint(None, lambda: (_ for _ in ()).throw(CheckpointError("boom")))


# -- with Keras -------------------------------------------------------------------------


def test_a_non_writer_leaves_nothing_in_the_tree(tmp_path):
    keras = pytest.importorskip("keras")
    import numpy as np

    import candle_ckpt

    params = {"ckpt_directory": str(tmp_path / "save"), "epochs": 2}
    keras.utils.set_random_seed(1)  # another test may have enabled op determinism
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mean_squared_error")
    assert candle_ckpt.restart(params, model, verbose=False, is_writer=False) is None
    x = np.ones((8, 4), "float32")
    callback = candle_ckpt.CandleCheckpointCallback(params, verbose=False, is_writer=False)
    model.fit(x, x[:, :1], epochs=2, verbose=0, callbacks=[callback])
    assert not os.path.exists(params["ckpt_directory"])
    with pytest.raises(TypeError, match="is_writer"):
        candle_ckpt.CandleCheckpointCallback(params, is_writer=1)
