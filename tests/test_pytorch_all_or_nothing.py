"""A crafted PyTorch model file, resealed as anyone who can write the tree can (its
CRC32 and ckpt-info.json's `info_crc32` recomputed), is refused whole: one line naming
the entry, exit status 3 for the example job, and the model, optimizer, scheduler,
generator and global random states exactly as they were (issue 34, findings 1 and 2).

The tree is the PyTorch example's (tests/torch_job.py), its first weight large enough
(128 KiB) to be read straight into the model's memory when the in-place read is on;
each case restarts with the in-place read on and off.
"""

import copy
import json
import os
import random
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import reseal
from keras_job import load_example
from test_pytorch_state import same
from torch_job import SMALL

torch = pytest.importorskip("torch")

import candle_ckpt  # noqa: E402
from candle_ckpt.core.storage import checksum  # noqa: E402
from candle_ckpt.pytorch import state  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "torch_job.py")
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "benchmark_pytorch.py")
WIDE = ["--n_features", "256", "--dense", "[128,16]", "--seed", "5"]
ENV = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def good_tree(tmp_path_factory):
    """Two epochs of the example job, trained in a child process."""
    root = str(tmp_path_factory.mktemp("all-or-nothing") / "save")
    subprocess.run(
        [sys.executable, JOB, "--ckpt_directory", root, "--epochs", "2", *WIDE],
        check=True,
        env=ENV,
        capture_output=True,
    )
    return root


@pytest.fixture
def tree(good_tree, tmp_path):
    root = str(tmp_path / "save")
    shutil.copytree(good_tree, root, symlinks=True)
    return root


def epoch_dir(root, epoch=2):
    return os.path.join(root, "ckpts", "epochs", f"{epoch:03d}")


def entry(pairs_value, key):
    """The value of `key` in an encoded dict ({"dict": [[k, v], ...]} or "odict")."""
    body = pairs_value.get("dict", pairs_value.get("odict"))
    return next(value for k, value in body if k == key)


def set_entry(pairs_value, key, new):
    body = pairs_value.get("dict", pairs_value.get("odict"))
    for pair in body:
        if pair[0] == key:
            pair[1] = new
            return
    raise KeyError(key)


def craft(root, change):
    """Apply `change(f, encoded)` to epoch 2's model.h5 (an h5py file open r+ and its
    'state' JSON, which it may edit), then reseal the file's CRC32 and ckpt-info.json."""
    directory = epoch_dir(root)
    path = os.path.join(directory, "model.h5")
    with h5py.File(path, "r+") as f:
        encoded = json.loads(np.asarray(f["state"][()], np.uint8).tobytes())
        change(f, encoded)
        del f["state"]
        f.create_dataset("state", data=np.frombuffer(json.dumps(encoded).encode(), np.uint8))
    reseal(directory)


def tensor_index(value):
    return value["tensor"] if "tensor" in value else value["ndarray"]


def optimizer_of(encoded):
    return entry(encoded["objects"], "optimizer")


def params_lists(f, encoded):
    for group in entry(optimizer_of(encoded), "param_groups"):
        params = entry(group, "params")
        params[:] = [[k] for k in params]


def metadata_five(f, encoded):
    set_entry(entry(encoded["objects"], "model")["metadata"], "0", 5)


def metadata_assign(f, encoded):
    metadata = entry(encoded["objects"], "model")["metadata"]
    set_entry(metadata, "0", {"dict": [["version", 1], ["assign_to_params_buffers", True]]})


def numpy_position_string(f, encoded):
    entry(encoded["rng"], "numpy")["tuple"][2] = "624"


def python_state_cut(f, encoded):
    words = entry(encoded["rng"], "python")["tuple"][1]["tuple"]
    del words[10:]


def described(encoded, value):
    """The table entry ([dtype, shape, offset, bytes]) of the tensor `value` refers to."""
    return encoded["tensors"][tensor_index(value)]


def all_255(name):
    def change(f, encoded):
        value = entry(encoded["objects"] if name == "generator" else encoded["rng"], name)
        _, _, offset, nbytes = described(encoded, value)
        f["data"][offset : offset + nbytes] = 255

    return change


def last_epoch_two(f, encoded):
    set_entry(entry(encoded["objects"], "scheduler"), "last_epoch", "two")


def exp_avg_wrong_shape(f, encoded):
    state = entry(optimizer_of(encoded), "state")
    first, second = (entry(state, k) for k in (0, 1))  # a weight's, then its bias'
    set_entry(first, "exp_avg", entry(second, "exp_avg"))


def numpy_key(encoded):
    """The table entry of the numpy random state's key array."""
    return described(encoded, entry(encoded["rng"], "numpy")["tuple"][1])


def numpy_dtype_bogus(f, encoded):
    numpy_key(encoded)[0] = "numpy:no-such-dtype"


def a_group_key_with_a_newline(f, encoded):
    group = entry(optimizer_of(encoded), "param_groups")[0]
    group["dict"].append(["lr\nRESTART OK", 0.5])


def numpy_key_big_endian(f, encoded):
    numpy_key(encoded)[0] = "numpy:>u4"


def numpy_key_objects(f, encoded):
    numpy_key(encoded)[0] = "numpy:O"


def byteorder_big(f, encoded):
    encoded["byteorder"] = "big"


def model_entry(encoded, key):
    return described(encoded, entry(entry(encoded["objects"], "model"), key))


def bias_past_the_data(f, encoded):
    """The last layer's bias (read after the large weight) ends past the data."""
    model_entry(encoded, "6.bias")[2] = f["data"].size - 2


def moment_on_the_weight(f, encoded):
    """The first moment of the last bias shares the bytes of the first weight."""
    state = entry(optimizer_of(encoded), "state")
    last = max(k for k, _ in state["dict"])
    moment = described(encoded, entry(entry(state, last), "exp_avg"))
    moment[2] = model_entry(encoded, "0.weight")[2]


def bias_bytes_wrong(f, encoded):
    model_entry(encoded, "6.bias")[3] += 4


def bias_dtype_unknown(f, encoded):
    model_entry(encoded, "6.bias")[0] = "float33"


def bias_shape_negative(f, encoded):
    model_entry(encoded, "6.bias")[1] = [-1]


def table_missing(f, encoded):
    del encoded["tensors"]


CASES = {
    "params-lists": (params_lists, "entry 'optimizer', param_groups[0]['params']"),
    "metadata-five": (metadata_five, "entry 'model': _metadata['0'] is 5"),
    "metadata-assign": (metadata_assign, "assign_to_params_buffers"),
    "numpy-position": (numpy_position_string, "the numpy random state"),
    "python-cut": (python_state_cut, "the Python random state"),
    "generator-255": (all_255("generator"), "entry 'generator' is not a state"),
    "torch-rng-255": (all_255("torch"), "the torch random state is not a state"),
    "last-epoch-two": (last_epoch_two, "entry 'scheduler', key 'last_epoch' is a str"),
    "exp-avg-shape": (exp_avg_wrong_shape, "state[0]['exp_avg'] is float32 of shape (128,)"),
    "numpy-dtype": (numpy_dtype_bogus, "'numpy:no-such-dtype'"),
    "big-endian": (numpy_key_big_endian, "numpy dtype of numbers in this machine's byte order"),
    "byteorder": (byteorder_big, "in another byte order than this machine's"),
    "object-dtype": (numpy_key_objects, "'numpy:O'; expected a numpy dtype of numbers"),
    "past-the-data": (bias_past_the_data, "the data dataset holds"),
    "overlap": (moment_on_the_weight, "overlaps tensor"),
    "bytes-wrong": (bias_bytes_wrong, "is described as"),
    "dtype-unknown": (bias_dtype_unknown, "'float33'; expected a torch dtype name"),
    "shape-negative": (bias_shape_negative, "expected [dtype name, [sizes], offset, bytes]"),
    "table-missing": (table_missing, "expected a dict with keys"),
    "group-key": (a_group_key_with_a_newline, "'lr\\nRESTART OK' (0.5), which the AdamW"),
}


def objects(root):
    """The example's registered objects, built as its run() builds them."""
    example = load_example("benchmark_pytorch.py")
    params = example.initialize_parameters(
        SMALL + ["--ckpt_directory", root, "--epochs", "3", *WIDE]
    )
    torch.manual_seed(params["seed"])
    net = example.build_model(params)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=params["learning_rate"], weight_decay=params["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, params["lr_step"], gamma=0.5)
    generator = torch.Generator().manual_seed(params["seed"])
    registered = {
        "model": net,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "generator": generator,
    }
    return params, registered


def everything(registered):
    """Every registered object's state and the global random states, copied."""
    return copy.deepcopy(
        {
            "model": registered["model"].state_dict(),
            "optimizer": registered["optimizer"].state_dict(),
            "scheduler": registered["scheduler"].state_dict(),
            "generator": registered["generator"].get_state(),
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
    )


def restart(params, registered):
    ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
    ckpt.set_model(registered)
    try:
        return ckpt.restart(verbose=False)
    finally:
        ckpt.finish()


@pytest.fixture(params=["in-place", "copied"])
def in_place(request, monkeypatch):
    """The large tensors read straight into the model (from any file size), or not."""
    if request.param == "in-place":
        monkeypatch.setattr(checksum, "IN_PLACE_MIN_BYTES", 0)
        monkeypatch.setattr(state, "IN_PLACE_MIN_BYTES", 0)
    return request.param == "in-place"


def test_the_resealed_tree_unchanged_restarts(tree, in_place, monkeypatch):
    """The crafting itself leaves a file that restarts, its first weight read in place
    when that is on: what the cases refuse is theirs, and on that path."""
    planned = []
    real = state.plan_in_place

    def noting(*args):
        planned.append(real(*args))
        return planned[-1]

    monkeypatch.setattr(state, "plan_in_place", noting)
    craft(tree, lambda f, encoded: None)
    params, registered = objects(tree)
    assert restart(params, registered)["epoch"] == 2
    read_in_place = [target.key for plan in planned for target in plan.targets.values()]
    assert read_in_place == (["0.weight"] if in_place else [])


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_entry_is_refused_and_nothing_changes(tree, in_place, case):
    change, fragment = CASES[case]
    craft(tree, change)
    params, registered = objects(tree)
    # a trained step first, so that the optimizer and the random states are not fresh
    registered["model"](torch.randn(4, 256)).sum().backward()
    registered["optimizer"].step()
    before = everything(registered)
    with pytest.raises(candle_ckpt.CheckpointFormatError) as refused:
        restart(params, registered)
    message = str(refused.value)
    assert fragment in message and "\n" not in message
    same(before, everything(registered))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_example_job_exits_3_with_one_line_naming_the_entry(tree, case):
    change, fragment = CASES[case]
    craft(tree, change)
    job = subprocess.run(
        [sys.executable, EXAMPLE, *SMALL, "--ckpt_directory", tree, "--epochs", "3", *WIDE],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 3, job.stderr
    lines = job.stderr.strip().splitlines()
    assert fragment in lines[-1]
    assert lines[-1].startswith("benchmark_pytorch.py: CheckpointFormatError: ")


class Picky:
    """An object whose own load_state_dict refuses what its state_dict gave."""

    def state_dict(self):
        return {"x": 1}

    def load_state_dict(self, state):
        raise RuntimeError("not today")


def test_an_object_that_fails_its_own_load_after_the_checks_says_what_is_loaded(tmp_path):
    net = torch.nn.Linear(2, 2)
    registered = {"model": net, "optimizer": torch.optim.SGD(net.parameters()), "picky": Picky()}
    path = str(tmp_path / "model.h5")
    state.write(state.snapshot(registered), path)
    contents = checksum.read_file(path)[0]
    with pytest.raises(candle_ckpt.CheckpointFormatError) as refused:
        state.restore(registered, path, contents, None)
    assert str(refused.value) == (
        f"'{path}': entry 'picky' passed every check, then failed to load (RuntimeError: "
        f"not today); loaded before it: ['model', 'optimizer']. Rebuild the model and its "
        f"optimizer, or restart from another checkpoint"
    )


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [1, 3], 0.5),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        o, 3
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=100),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.001, 0.1, cycle_momentum=False),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 0.9**epoch),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [torch.optim.lr_scheduler.ConstantLR(o), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[2],
    ),
}
OPTIMIZERS = ["SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam"]
OPTIMIZERS += ["RAdam", "RMSprop", "Rprop", "LBFGS", "Adafactor"]


def trained_with(optimizer, scheduler, seed, steps):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    kwargs = {"momentum": 0.9} if optimizer == "SGD" else {}
    opt = getattr(torch.optim, optimizer)(net.parameters(), lr=0.01, **kwargs)
    registered = {"model": net, "optimizer": opt, "scheduler": SCHEDULERS[scheduler](opt)}
    for _ in range(steps):
        train_step(registered)
    return registered


def train_step(registered):
    """One step of the optimizer (and the scheduler), whatever their kind."""
    net, opt, sched = registered["model"], registered["optimizer"], registered["scheduler"]

    def loss():
        opt.zero_grad()
        value = net(torch.randn(16, 4)).pow(2).mean()
        value.backward()
        return value

    opt.step(loss)
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(1.0)
    else:
        sched.step()


@pytest.mark.parametrize(
    "optimizer,scheduler",
    [(name, "StepLR") for name in OPTIMIZERS if hasattr(torch.optim, name)]
    + [("AdamW", name) for name in SCHEDULERS if name != "StepLR"],
)
def test_every_torch_optimizer_and_scheduler_state_passes_the_checks(
    tmp_path, optimizer, scheduler
):
    """The checks refuse what torch would fail on, never what torch itself wrote."""
    path = str(tmp_path / "model.h5")
    state.write(state.snapshot(trained_with(optimizer, scheduler, 0, 4)), path)
    fresh = trained_with(optimizer, scheduler, 1, 0)
    state.restore(fresh, path, checksum.read_file(path)[0], None)
    train_step(fresh)
