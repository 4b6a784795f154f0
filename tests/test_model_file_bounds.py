"""Crafted model files: what candle_ckpt never writes is refused before its data is
read, in bounded memory, in one line naming the file, and a crash or a hang of the
HDF5 library parsing a file ends a child process, not the restart.

Each crafted file is a candle_ckpt PyTorch (or Keras, for `export`) model file with one
thing we never write; the memory bombs are read in a forked child under RLIMIT_AS far
below what they declare, so that a check that came too late fails the test with a
MemoryError rather than taking the machine's memory.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
import zlib

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import candle_ckpt  # noqa: E402
from candle_ckpt import hdf5_check  # noqa: E402
from candle_ckpt.core.errors import CheckpointError, CheckpointFormatError  # noqa: E402
from candle_ckpt.core.format.info import info_file_bytes  # noqa: E402
from candle_ckpt.keras.weights_h5 import write_weights_h5  # noqa: E402
from candle_ckpt.pytorch import state  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), OMP_NUM_THREADS="1")
GIB = 1 << 30


def torch_file(path, tensors, text=None):
    """A candle_ckpt PyTorch model file whose module "model" holds one tensor per
    `tensors` entry (name -> function(group, dataset name) creating its dataset), and
    `text` as its JSON state if given."""
    items = [[name, {"tensor": k}] for k, name in enumerate(tensors)]
    encoded = {
        "objects": {"dict": [["model", {"odict": items, "metadata": None}]]},
        "rng": {"dict": []},
    }
    with h5py.File(path, "w") as f:
        f.attrs[state.FORMAT_ATTR] = 1
        f.attrs["weights_only"] = True
        raw = text if text is not None else json.dumps(encoded).encode()
        f.create_dataset("state", data=np.frombuffer(raw, np.uint8))
        group = f.create_group("tensors")
        for k, make in enumerate(tensors.values()):
            made = make(group, str(k))
            if isinstance(made, h5py.Dataset):
                made.attrs["torch_dtype"] = "float32"
                made.attrs["shape"] = np.asarray(made.shape, np.int64)
    with open(path, "rb") as stream:
        return memoryview(stream.read())


def plain(group, name):
    return group.create_dataset(name, data=np.arange(4, dtype=np.float32))


def never_written(group, name):  # 3 GiB declared, no byte of it allocated
    return group.create_dataset(name, shape=(3 * GIB // 4,), dtype=np.float32)


def gzip_bomb(group, name):  # 256 MiB of zeros in a few hundred KiB
    made = group.create_dataset(
        name, shape=(64 << 20,), dtype=np.float32, chunks=(1 << 20,), compression="gzip"
    )
    made[:] = 0
    return made


def chunked(group, name):
    return group.create_dataset(name, data=np.zeros(1024, np.float32), chunks=(256,))


def big_endian(group, name):
    return group.create_dataset(name, data=np.arange(4, dtype=">f4"))


def compact(group, name):
    space = h5py.h5s.create_simple((4,))
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_layout(h5py.h5d.COMPACT)
    h5py.h5d.create(group.id, name.encode(), h5py.h5t.NATIVE_FLOAT, space, plist)
    return group[name]


def external(group, name):
    return group.create_dataset(
        name, shape=(4,), dtype=np.float32, external=[("/etc/passwd", 0, 16)]
    )


def soft_link(group, name):
    group.create_dataset("elsewhere", data=np.arange(4, dtype=np.float32))
    group[name] = h5py.SoftLink(group.name + "/elsewhere")


def strings(group, name):
    return group.create_dataset(name, data=np.array([b"ab", b"cd"]))


CRAFTED = {
    "never_written": (never_written, "not stored whole inside the file"),
    "gzip_bomb": (gzip_bomb, "is chunked"),
    "chunked": (chunked, "is chunked"),
    "big_endian": (big_endian, "native byte order"),
    "compact": (compact, "is compact"),
    "external": (external, "stored in other files"),
    "soft_link": (soft_link, "SoftLink"),
    "strings": (strings, "writes numbers"),
}


def in_child(function, memory_bytes, timeout=120):
    """Run `function()` in a fork under RLIMIT_AS of what it has plus `memory_bytes`;
    return ("ok", repr of its value) or (exception type name, message)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            with open("/proc/self/statm") as stream:
                mapped = int(stream.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_bytes, resource.RLIM_INFINITY))
            try:
                result = ["ok", repr(function())[:2000]]
            except BaseException as error:
                result = [type(error).__name__, str(error)[:2000]]
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{function} did not end within {timeout} s")
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as stream:
        report = stream.read()
    assert report, "the child died without a report"
    return tuple(json.loads(report))


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_what_candle_ckpt_never_writes_is_refused_before_its_data_is_read(tmp_path, case):
    make, fragment = CRAFTED[case]
    path = str(tmp_path / "model.h5")
    contents = torch_file(path, {"0.weight": plain, "1.weight": make})
    assert len(contents) < 1 << 20
    # The memory cap is far below what the file declares, but above its own size.
    outcome, message = in_child(lambda: state.read(contents, path), 64 << 20)
    assert outcome == "CheckpointFormatError", message
    assert path in message and fragment in message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["gzip_bomb", "never_written"])
def test_export_of_a_keras_file_refuses_the_same(tmp_path, case):
    make, fragment = CRAFTED[case]
    path = str(tmp_path / "model.h5")
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"dense"])
        f.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {}})
        layer = f.create_group("dense")
        layer.attrs["weight_names"] = np.array([b"dense/kernel"])
        make(layer.create_group("dense"), "kernel")
    with open(path, "rb") as stream:
        contents = memoryview(stream.read())
    destination = str(tmp_path / "out.weights.h5")
    outcome, message = in_child(lambda: write_weights_h5(contents, path, destination), 64 << 20)
    assert outcome == "CheckpointFormatError" and fragment in message, message
    assert not os.path.exists(destination)


def test_a_file_we_write_passes_the_check(tmp_path):
    contents = torch_file(str(tmp_path / "model.h5"), {"0.weight": plain})
    hdf5_check.check(contents, "model.h5")
    assert state.read(contents, "model.h5")[0]["objects"]["model"]["0.weight"].tolist() == [
        0.0,
        1.0,
        2.0,
        3.0,
    ]


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda data: data.__setitem__(8, 2), "superblock version 2"),
        (lambda data: data.__setitem__(13, 4), "4-byte addresses"),
        (
            lambda data: data.__setitem__(slice(40, 48), (1 << 40).to_bytes(8, "little")),
            "end of file",
        ),
        (lambda data: data.__setitem__(0, 0), "HDF5 signature"),
    ],
)
def test_a_bad_superblock_is_refused_before_the_hdf5_library_sees_it(tmp_path, damage, fragment):
    data = bytearray(torch_file(str(tmp_path / "model.h5"), {"0.weight": plain}))
    damage(data)
    with pytest.raises(CheckpointFormatError, match=fragment):
        hdf5_check.check(data, "model.h5")


def checker_that(monkeypatch, code):
    """Make the checker process run `code` after importing candle_ckpt.hdf5_check as c
    (the real one: `c.child_main()` walks the file)."""
    root = os.path.dirname(HERE)
    script = f"import sys; sys.path.insert(0, {root!r}); import candle_ckpt.hdf5_check as c; "
    monkeypatch.setattr(hdf5_check, "_child_command", lambda: [sys.executable, "-c", script + code])
    monkeypatch.setattr(hdf5_check, "_checker", None)  # not the one kept from before


def test_one_checker_checks_file_after_file_and_a_new_one_follows_it(tmp_path, monkeypatch):
    contents = torch_file(str(tmp_path / "model.h5"), {"0.weight": plain})
    monkeypatch.setattr(hdf5_check, "IDLE_SECONDS", 2.0)
    checker_that(monkeypatch, "c.IDLE_SECONDS = 2.0; c.child_main()")
    hdf5_check.check(contents, "model.h5")
    first = hdf5_check._checker.pid
    hdf5_check.check(contents, "model.h5")
    assert hdf5_check._checker.pid == first
    hdf5_check._checker.wait(timeout=30)  # idle: it exits by itself
    hdf5_check.check(contents, "model.h5")
    assert hdf5_check._checker.pid != first


def test_a_crash_of_the_hdf5_library_is_a_refusal(tmp_path, monkeypatch):
    contents = torch_file(str(tmp_path / "model.h5"), {"0.weight": plain})
    # What a segfault in h5py parsing a damaged header does to the checker.
    checker_that(monkeypatch, "import ctypes; ctypes.string_at(0)")
    with pytest.raises(CheckpointFormatError, match=r"crashed \(SIGSEGV\) parsing its headers"):
        hdf5_check.check(contents, "model.h5")


def test_a_hang_of_the_hdf5_library_is_a_refusal(tmp_path, monkeypatch):
    contents = torch_file(str(tmp_path / "model.h5"), {"0.weight": plain})
    checker_that(monkeypatch, "import time; time.sleep(60)")
    monkeypatch.setattr(hdf5_check, "CHECK_SECONDS", 2.0)
    started = time.monotonic()
    with pytest.raises(CheckpointFormatError, match="did not end within 2 s"):
        hdf5_check.check(contents, "model.h5")
    assert time.monotonic() - started < 30


def test_the_checker_runs_under_a_memory_cap(tmp_path, monkeypatch):
    contents = torch_file(str(tmp_path / "model.h5"), {"0.weight": plain})
    # An allocation HDF5 would make for a header declaring 1 GiB: refused by the cap.
    checker_that(monkeypatch, "c._walk = lambda served: bytearray(1 << 30) and ''; c.child_main()")
    with pytest.raises(CheckpointFormatError, match="ended with status 1 and no verdict"):
        hdf5_check.check(contents, "model.h5")


@pytest.mark.parametrize(
    "text, fragment",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests 100000 levels deep"),
        (b'{"objects": {}, "rng": {"' + b"x" * 5000 + b'": 1}}', "string longer than 4096"),
        (b'{"objects": {}, "rng": "\\"' + b"x" * 5000 + b'"}', "string longer than 4096"),
        (b'{"objects": {}, "rng": {}', "not UTF-8 JSON"),
    ],
)
def test_the_json_state_is_bounded_before_it_is_parsed(tmp_path, text, fragment):
    path = str(tmp_path / "model.h5")
    contents = torch_file(path, {"0.weight": plain}, text=text)
    outcome, message = in_child(lambda: state.read(contents, path), 64 << 20)
    assert outcome == "CheckpointFormatError" and fragment in message, message


def test_json_that_would_inflate_is_refused_in_bounded_memory(tmp_path):
    """900 levels of dicts with 1.7 KB keys: 1.7 MB of JSON whose decoding built
    gigabytes of entry paths."""
    key = b"k" * 1700
    level = b'{"dict": [["' + key + b'", '
    text = b'{"objects": ' + level * 900 + b"1" + b"]]}" * 900 + b', "rng": {}}'
    path = str(tmp_path / "model.h5")
    contents = torch_file(path, {"0.weight": plain}, text=text)
    outcome, message = in_child(lambda: state.read(contents, path), 64 << 20)
    assert outcome == "CheckpointFormatError" and "levels deep" in message, message


def reseal(directory, name="model.h5"):
    """Record the epoch's model file's current size and CRC32 in its ckpt-info.json."""
    info_path = os.path.join(directory, "ckpt-info.json")
    with open(info_path) as stream:
        info = json.load(stream)
    with open(os.path.join(directory, name), "rb") as stream:
        data = stream.read()
    crc = str(zlib.crc32(data))
    info["files"][name] = {"size": len(data), "crc32": crc}
    info["checksum"] = crc
    info.pop("info_crc32")
    with open(info_path, "wb") as stream:
        stream.write(info_file_bytes(info))


@pytest.fixture
def tree(tmp_path):
    """A PyTorch tree of one epoch of a small model: (params, epoch directory)."""
    params = {"ckpt_directory": str(tmp_path / "save"), "epochs": 1, "ckpt_save_interval": 1}
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    ckpt = candle_ckpt.CandleCkptPyTorch(params, logger=None, verbose=False)
    ckpt.set_model({"model": model})
    ckpt.ckpt_epoch(0, {"val_loss": 1.0})
    ckpt.finish()
    return params, os.path.join(params["ckpt_directory"], "ckpts", "epochs", "001")


def test_restart_and_export_refuse_a_resealed_gzip_bomb_in_one_line(tree, tmp_path):
    params, directory = tree
    path = os.path.join(directory, "model.h5")
    torch_file(path, {"0.weight": gzip_bomb, "0.bias": plain})
    reseal(directory)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = [p.detach().clone() for p in model.parameters()]
    ckpt = candle_ckpt.CandleCkptPyTorch(
        dict(params, ckpt_restart_mode="required"), logger=None, verbose=False
    )
    ckpt.set_model({"model": model})
    with pytest.raises(CheckpointFormatError, match="is chunked"):
        ckpt.restart(verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "candle_ckpt",
            "export",
            params["ckpt_directory"],
            "--to",
            str(tmp_path / "out.pt"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 2 and "is chunked" in exported.stderr
    assert exported.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "out.pt")


def test_a_model_file_larger_than_memory_is_refused_in_one_line_before_allocating(tree):
    """A 50 GiB sparse model.h5, its size and CRC32 recorded in a valid ckpt-info.json:
    no machine this runs on lends one process 50 GiB of memory on top of what it has
    (the cap: RLIMIT_AS), so the restart refuses, exit status 3, before reading it."""
    params, directory = tree
    path = os.path.join(directory, "model.h5")
    size = 50 * GIB
    with open(path, "r+b") as stream:
        stream.truncate(size)
    info_path = os.path.join(directory, "ckpt-info.json")
    with open(info_path) as stream:
        info = json.load(stream)
    info["files"]["model.h5"] = {"size": size, "crc32": "1"}
    info["checksum"] = "1"
    info.pop("info_crc32")
    with open(info_path, "wb") as stream:
        stream.write(info_file_bytes(info))

    def restart():
        ckpt = candle_ckpt.CandleCkptPyTorch(
            dict(params, ckpt_restart_mode="required"), logger=None, verbose=False
        )
        ckpt.set_model({"model": torch.nn.Sequential(torch.nn.Linear(4, 4))})
        try:
            ckpt.restart(verbose=False)
        except CheckpointError as error:
            from candle_ckpt.core.errors import exit_status

            return exit_status(error), str(error)

    outcome, message = in_child(restart, 4 * GIB)
    assert outcome == "ok", message
    assert message.startswith("(3, ") and "50.0 GiB, more memory than this process" in message
    assert "RLIMIT_AS" in message and "\\n" not in message


@pytest.mark.parametrize("side", [4, 4200], ids=["small", "read-in-place"])
def test_a_corrupt_model_file_is_refused_by_its_crc_before_any_parser_sees_it(
    tmp_path, monkeypatch, side
):
    """With checksums on, a flipped byte never reaches HDF5 (nor torch.load): not at a
    restart (also one reading a file of 64 MiB or more into the model's memory), a warm
    start or an export."""
    from candle_ckpt.core.errors import ChecksumMismatchError
    from candle_ckpt.core.format.layout import CheckpointLayout
    from candle_ckpt.operator.export import export_epoch

    params = {"ckpt_directory": str(tmp_path / "save"), "epochs": 1}
    ckpt = candle_ckpt.CandleCkptPyTorch(params, logger=None, verbose=False)
    ckpt.set_model({"model": torch.nn.Linear(side, side, bias=False)})
    ckpt.ckpt_epoch(0, {"val_loss": 1.0})
    ckpt.finish()
    path = os.path.join(params["ckpt_directory"], "ckpts", "epochs", "001", "model.h5")
    with open(path, "r+b") as stream:  # a byte of the superblock: any parser would see it
        stream.seek(20)
        byte = stream.read(1)
        stream.seek(20)
        stream.write(bytes([byte[0] ^ 0xFF]))

    def parsed(*args, **kwargs):
        raise AssertionError("a parser saw the corrupt file")

    monkeypatch.setattr(h5py, "File", parsed)
    monkeypatch.setattr(hdf5_check, "check", parsed)
    monkeypatch.setattr(torch, "load", parsed)
    model = torch.nn.Linear(side, side, bias=False)
    before = model.weight.detach().clone()
    restart = candle_ckpt.CandleCkptPyTorch(
        dict(params, ckpt_restart_mode="required"), logger=None, verbose=False
    )
    restart.set_model({"model": model})
    with pytest.raises(ChecksumMismatchError, match="model.h5"):
        restart.restart(verbose=False)
    warm = candle_ckpt.CandleCkptPyTorch(
        {
            "ckpt_directory": str(tmp_path / "new"),
            "epochs": 1,
            "ckpt_init_from": params["ckpt_directory"],
        },
        logger=None,
        verbose=False,
    )
    warm.set_model({"model": model})
    with pytest.raises(CheckpointError, match="CRC32"):
        warm.restart(verbose=False)
    assert torch.equal(before, model.weight)  # read in place only once it verified
    with pytest.raises(CheckpointError, match="fails verification"):
        export_epoch(CheckpointLayout(params["ckpt_directory"]), 1, str(tmp_path / "out.pt"))
