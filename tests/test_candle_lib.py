"""A benchmark written for upstream CANDLE (candle_lib) switches by its import alone.

The trees are written as candle_lib's own code writes them (tests/candle_lib_tree.py);
each ECP-CANDLE/Benchmarks call order (NT3, Uno, P1B2, P1B1) then continues such a tree
with candle_ckpt and ends bit-identical to an uninterrupted run. No spelling of the
directory, existing tree, forgotten `initial_epoch` or dangling `last` starts a run over
without a word.
"""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import candle_ckpt
from candle_ckpt.core.errors import ParameterValueError

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import candle_lib_job as job  # noqa: E402
from candle_lib_tree import UpstreamTreeWriter, torch_upstream_save  # noqa: E402
from keras_helpers import assert_same_state  # noqa: E402

EPOCHS = 6


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Where candle_lib's tree is, and the parameters naming it: its default (None ->
# <output_dir>/ckpts) and an explicit ckpt_directory.
SPELLINGS = {
    "default": ({"ckpt_directory": None, "output_dir": "out"}, "out/ckpts"),
    "explicit": ({"ckpt_directory": "run7/tree", "output_dir": "elsewhere"}, "run7/tree"),
}


def params_for(spelling, epochs=EPOCHS):
    overrides, root = SPELLINGS[spelling]
    return {**job.candle_lib_params("out", epochs), **overrides}, root


def keras_uninterrupted():
    x, y = job.data()
    model = job.build(dropout=False)
    job.compile_model(model)
    model.fit(x, y, epochs=EPOCHS, validation_data=(x[:32], y[:32]), **job.FIT)
    return model.get_weights()


def assert_same_weights(expected, model):
    got = model.get_weights()
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_nt3_order_continues_a_candle_lib_tree_bit_identically(in_tmp, spelling, caplog):
    """restart(model) before model.compile: weights at restart, the optimizer and RNG
    state when fit starts; the candle_lib tree gets candle_ckpt's epochs 4-6."""
    expected = keras_uninterrupted()
    params, root = params_for(spelling)
    job.upstream(params, 3, dropout=False)
    assert os.readlink(f"{root}/last") == str(in_tmp / root / "epochs" / "003")
    with caplog.at_level(logging.INFO, logger="candle_ckpt"):
        model = job.nt3({**params, "ckpt_keep_limit": 1}, dropout=False)
    assert_same_weights(expected, model)
    # the keep policy deletes this run's epochs only, never those candle_lib wrote
    assert sorted(os.listdir(f"{root}/epochs")) == ["001", "002", "003", "006"]
    assert "is not compiled: its weights are loaded now" in caplog.text
    assert os.readlink(f"{root}/last") == "epochs/006"
    assert not os.path.exists(f"{root}/ckpts")  # no second tree inside the first
    log = open(f"{root}/ckpt.log").read()
    assert "CandleCkpt: saved epoch 3" in log and "epoch 6 saved" in log


def test_uno_order_restart_with_params_then_best_metric_last(in_tmp):
    """Uno: restart(params) restores the model given to set_model; J carries
    candle_lib's best_metric_last, which Uno puts back into its parameters."""
    expected = keras_uninterrupted()
    params, _ = params_for("default")
    job.upstream(params, 3, dropout=False)
    x, y = job.data()
    template_model = job.build(dropout=False)
    ckpt = candle_ckpt.CandleCkptKeras(params, verbose=True)
    ckpt.set_model(template_model)
    J = ckpt.restart(params)
    assert J["batch"] == 0  # always added: the batches of the next epoch already trained
    assert sorted(J) == sorted(
        [
            "batch",
            "epoch",
            "save_best_metric",
            "best_metric_last",
            "model_file",
            "checksum",
            "timestamp",
            "time_elapsed",
            "metadata",
        ]
    )
    params["ckpt_best_metric_last"] = J["best_metric_last"]
    model = template_model
    job.compile_model(model)
    model.fit(
        x,
        y,
        epochs=EPOCHS,
        initial_epoch=J["epoch"],
        validation_data=(x[:32], y[:32]),
        callbacks=[ckpt],
        **job.FIT,
    )
    assert_same_weights(expected, model)
    J = candle_ckpt.CandleCkptKeras(params, verbose=False).restart(job.build(dropout=False))
    assert J["epoch"] == EPOCHS and "best_metric_last" in J


def test_p1b2_order_compiled_before_restart(in_tmp):
    """P1B2 (ckpt_save_interval > 0): the model is compiled before restart."""
    expected = keras_uninterrupted()
    params, _ = params_for("explicit")
    job.upstream(params, 2, dropout=False)
    x, y = job.data()
    model = job.build(dropout=False)
    job.compile_model(model)
    if params["ckpt_save_interval"] > 0:
        ckpt = candle_ckpt.CandleCkptKeras(params, verbose=False)
        ckpt.set_model(model)
        J = ckpt.restart(model)
        initial_epoch = J["epoch"]
    model.fit(
        x,
        y,
        epochs=EPOCHS,
        initial_epoch=initial_epoch,
        validation_data=(x[:32], y[:32]),
        callbacks=[ckpt],
        **job.FIT,
    )
    assert_same_weights(expected, model)


def torch_setup():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = (torch.from_numpy(a) for a in job.data())
    return model, optimizer, x, y


def torch_epoch(model, optimizer, x, y):
    import torch

    total = 0.0
    for start in range(0, len(x), 16):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[start : start + 16]), y[start : start + 16])
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_p1b1_pytorch_order_continues_a_candle_lib_tree_bit_identically(in_tmp, spelling):
    import torch

    model, optimizer, x, y = torch_setup()
    for _ in range(EPOCHS):
        torch_epoch(model, optimizer, x, y)
    expected = [p.detach().clone() for p in model.parameters()]

    params, root = params_for(spelling)
    model, optimizer, x, y = torch_setup()
    writer = UpstreamTreeWriter(params)
    for epoch in range(3):  # candle_lib's CandleCkptPyTorch, killed after epoch 3
        train_loss = torch_epoch(model, optimizer, x, y)
        torch_upstream_save(writer, epoch, train_loss, model, optimizer)

    model, optimizer, x, y = torch_setup()
    initial_epoch = 0
    ckpt = candle_ckpt.CandleCkptPyTorch(params)
    ckpt.set_model({"model": model, "optimizer": optimizer})
    J = ckpt.restart(model)
    if J is not None:
        initial_epoch = J["epoch"]
    assert initial_epoch == 3
    for epoch in range(initial_epoch, params["epochs"]):
        train_loss = torch_epoch(model, optimizer, x, y)
        ckpt.ckpt_epoch(epoch, train_loss)
    for a, b in zip(expected, model.parameters()):
        assert torch.equal(a, b)
    assert os.readlink(f"{root}/last") == "epochs/006"
    assert not os.path.exists(f"{root}/ckpts")


# -- the directory rule --------------------------------------------------------------


def seed_tree(ckpt_directory):
    """What the seed's rule (before `core.format.locate`) made of `ckpt_directory`: a tree in
    <ckpt_directory>/ckpts, whatever its name."""
    os.makedirs(os.path.join(ckpt_directory, "ckpts", "epochs"))


def test_the_rule_finds_each_layout_and_picks_one_for_a_new_run(in_tmp):
    from candle_ckpt.core.format.locate import run_layout
    from candle_ckpt.core.params import validate_params

    def tree(**params):
        return run_layout(validate_params(params)).ckpts

    assert tree() == str(in_tmp / "save" / "ckpts")  # the seed's default
    assert tree(ckpt_directory=None) == str(in_tmp / "save" / "ckpts")
    assert tree(ckpt_directory=None, output_dir="out") == str(in_tmp / "out" / "ckpts")
    assert tree(ckpt_directory="run") == str(in_tmp / "run" / "ckpts")
    assert tree(ckpt_directory="run/ckpts") == str(in_tmp / "run" / "ckpts")
    os.makedirs("p1b2/epochs")  # candle_lib's tree at a ckpt_directory of any name
    assert tree(ckpt_directory="p1b2") == str(in_tmp / "p1b2")
    seed_tree("named/ckpts")  # the seed's tree under a directory named ckpts
    assert tree(ckpt_directory="named/ckpts") == str(in_tmp / "named" / "ckpts" / "ckpts")


@pytest.mark.parametrize(
    "trees,params,picked,other",
    [
        # candle_lib's tree at out/ckpts, and the seed's nested one a resubmission
        # with ckpt_directory=out/ckpts wrote inside it
        (
            ["out/ckpts", "out/ckpts/ckpts"],
            {"ckpt_directory": "out/ckpts"},
            "out/ckpts",
            "out/ckpts/ckpts",
        ),
        (
            ["out/ckpts", "out/ckpts/ckpts"],
            {"ckpt_directory": None, "output_dir": "out"},
            "out/ckpts",
            "out/ckpts/ckpts",
        ),
        # candle_lib's tree at a ckpt_directory, and the seed's beside it
        (["run", "run/ckpts"], {"ckpt_directory": "run"}, "run", "run/ckpts"),
        # a new run where only a nested tree exists
        (["out/ckpts/ckpts"], {"ckpt_directory": "out"}, "out/ckpts", "out/ckpts/ckpts"),
        # the default ckpt_directory, and candle_lib's default tree in output_dir
        (["out/ckpts"], {"output_dir": "out"}, "save/ckpts", "out/ckpts"),
    ],
)
def test_a_tree_where_the_rule_did_not_look_first_is_refused(in_tmp, trees, params, picked, other):
    for path in trees:
        os.makedirs(os.path.join(path, "epochs"))
    params = {"epochs": 3, "ckpt_restart_mode": "auto", **params}
    for attempt in (
        lambda: candle_ckpt.CandleCkptPyTorch(params, verbose=False),
        lambda: candle_ckpt.CandleCheckpointCallback(params, verbose=False),
    ):
        with pytest.raises(ParameterValueError) as refused:
            attempt()
        message = str(refused.value)
        assert f"'{in_tmp / picked}'" in message and f"'{in_tmp / other}'" in message
        assert f"ckpt_directory={str(in_tmp / other)!r}" in message
        assert ("ckpt_directory=" in message.split("looks")[0]) or "output_dir" in message
    assert sorted(os.listdir(in_tmp / trees[0] / "epochs")) == []  # nothing written


def test_the_cli_follows_the_same_rule(in_tmp):
    params, root = params_for("default")
    writer = UpstreamTreeWriter(params)
    for epoch in range(2):
        writer.save(epoch, 1.0 - epoch, lambda path: open(path, "wb").write(b"x"))
    listing = cli("list", root)
    assert listing.returncode == 0, listing.stderr
    assert str(in_tmp / root) in listing.stdout and "002" in listing.stdout
    seed_tree(f"{root}/ckpts")
    refused = cli("list", root)
    assert refused.returncode == 2 and str(in_tmp / root / "ckpts") in refused.stderr


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "candle_ckpt", *args], capture_output=True, text=True, timeout=60
    )


# -- no ordinary move starts over silently -------------------------------------------


def test_forgotten_initial_epoch_is_refused_before_the_first_step(in_tmp):
    params, root = params_for("default")
    job.upstream(params, 3, dropout=False)
    x, y = job.data()
    model = job.build(dropout=False)
    ckpt = candle_ckpt.CandleCkptKeras(params, verbose=False)
    ckpt.set_model(model)
    J = ckpt.restart(model)
    job.compile_model(model)
    steps = []
    import keras

    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda *a: steps.append(1))
    with pytest.raises(ParameterValueError) as refused:
        model.fit(x, y, epochs=EPOCHS, callbacks=[counter, ckpt], **job.FIT)
    message = str(refused.value)
    assert "restored epoch 3" in message and "begins at epoch 1" in message
    assert 'initial_epoch=J["epoch"]' in message
    assert steps == [] and J["epoch"] == 3
    assert sorted(os.listdir(f"{root}/epochs")) == ["001", "002", "003"]


def test_forgotten_start_epoch_in_a_pytorch_loop_is_refused_before_a_save(in_tmp):
    params, root = params_for("explicit")
    model, optimizer, x, y = torch_setup()
    writer = UpstreamTreeWriter(params)
    for epoch in range(3):
        torch_upstream_save(writer, epoch, torch_epoch(model, optimizer, x, y), model, optimizer)
    ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
    ckpt.set_model({"model": model, "optimizer": optimizer})
    assert ckpt.restart(model)["epoch"] == 3
    with pytest.raises(ParameterValueError, match=r"restored epoch 3 .* begins at epoch 1"):
        ckpt.ckpt_epoch(0, torch_epoch(model, optimizer, x, y))
    assert os.readlink(f"{root}/last").endswith("epochs/003")


@pytest.mark.parametrize("link", ["epochs/009", None])
def test_a_dangling_or_missing_last_beside_epochs_warns_with_the_remedy(in_tmp, caplog, link):
    """A dangling last (a typo in a rollback by hand), or none beside saved epochs
    (candle_lib killed between removing last and making it again), still means: start
    from scratch, but loudly, naming the epochs there are and the remedy."""
    params, root = params_for("default")
    job.upstream(params, 3, dropout=False)
    os.remove(f"{root}/last")
    if link is not None:
        os.symlink(link, f"{root}/last")
    ckpt = candle_ckpt.CandleCkptKeras(params, verbose=False)
    ckpt.set_model(job.build(dropout=False))
    with caplog.at_level(logging.WARNING, logger="candle_ckpt"):
        assert ckpt.restart() is None
    [record] = [r for r in caplog.records if r.name.startswith("candle_ckpt")]
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "STARTING FROM SCRATCH" in message
    assert ("-> 'epochs/009'" in message) == (link is not None)
    assert "epochs on disk: 1, 2, 3" in message
    assert f"candle-ckpt rollback {in_tmp / root} N" in message
    assert "STARTING FROM SCRATCH" in open(f"{root}/ckpt.log").read()


# -- kill -9 -------------------------------------------------------------------------


def run_job(*args, killed=False):
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "candle_lib_job.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == (-9 if killed else 0), result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_candle_ckpt_keras_resumes_exactly_after_kill_9(tmp_path):
    """NT3's order, with a seeded Dropout: killed mid-epoch 4 of a run that continued a
    candle_lib tree of 2 epochs, rerun, it ends with the uninterrupted run's weights,
    optimizer and RNG state."""
    reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    for out in (reference, interrupted):
        run_job(out, str(EPOCHS), "--upstream", "2")
    run_job(reference, str(EPOCHS))
    run_job(interrupted, str(EPOCHS), "--kill_at", "4:3", killed=True)
    assert os.readlink(f"{interrupted}/ckpts/last") == "epochs/003"
    run_job(interrupted, str(EPOCHS))
    assert_same_state(
        f"{reference}/ckpts/epochs/006/model.h5", f"{interrupted}/ckpts/epochs/006/model.h5"
    )


# -- candle_lib's parameters -----------------------------------------------------------


def test_every_key_candle_lib_defines_or_reads_is_accepted_with_its_meaning(in_tmp):
    """The values candle_lib's ckpt_parser gives (its defaults, explicitly), and the
    keys its CandleCkpt reads besides (metadata, ckpt_best_metric_last,
    ckpt_timestamp_last, output_dir)."""
    from candle_ckpt.core.format.locate import run_layout
    from candle_ckpt.core.params import validate_params

    params = {
        **job.candle_lib_params("out", EPOCHS),
        "metadata": "job 42 on node7",
        "ckpt_best_metric_last": 0.25,
        "ckpt_timestamp_last": "2022-01-01 10:00:00",
    }
    settings = validate_params(params, require_epochs=True)
    assert settings["ckpt_keep_mode"] == "linear"  # candle_lib's parser: no default
    assert settings["ckpt_keep_limit"] == 5 and settings["ckpt_checksum"] is False
    assert settings["ckpt_best_metric_last"] == 0.25 and settings["metadata"] == "job 42 on node7"
    assert run_layout(settings).ckpts == str(in_tmp / "out" / "ckpts")
    # math.inf is candle_lib's "no best yet" (Uno copies J["best_metric_last"] back)
    for infinite in (float("inf"), "inf", "Infinity"):
        again = validate_params({**params, "ckpt_best_metric_last": infinite})
        assert again["ckpt_best_metric_last"] is None


def test_ckpt_best_metric_last_seeds_the_best_of_a_run_that_resumes_nothing(make_checkpointer):
    from conftest import file_writer

    checkpointer = make_checkpointer(
        ckpt_best_metric_last=0.5, ckpt_save_interval=10, ckpt_save_best_metric="val_loss"
    )
    checkpointer.epoch_end(1, {"val_loss": 0.7}, file_writer())  # worse than 0.5
    checkpointer.epoch_end(2, {"val_loss": 0.4}, file_writer())  # better
    checkpointer.finish()
    assert checkpointer.layout.list_epochs() == [2]
