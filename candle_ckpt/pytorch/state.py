"""What is written: a PyTorch run's training state as ``model.h5``, and back, exactly.

`snapshot` takes every registered object's state on the training thread, `write` turns
it into ``model.h5`` (h5py lays the file out in memory, `hdf5.write_file` writes it and
the large tensors without holding the GIL, so it may run in a background thread beside
training), and `restore` loads a file into the registered objects, validating
everything first and building the tensors on the verified bytes in place.

File layout (format version 1)
------------------------------
An HDF5 file holding the state as JSON and every tensor as a dataset: docs/FORMAT.md,
"Model files", describes it; this module is its one implementation.

Why HDF5 and JSON
-----------------
Loading parses JSON and reads arrays: nothing in the file is ever executed, unlike a
pickle, and the Keras adapter's HDF5 code (contiguous datasets read as views of the
verified bytes) is shared. `torch.load(weights_only=True)` is safe too, but only for
the types its allow-list knows; upstream CANDLE's torch pickles go through it
(`restore_upstream`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import pickle
import random
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any, BinaryIO

import h5py
import numpy as np
import torch

from ..core.adapter import Restored
from ..core.errors import CheckpointFormatError, failed_after_checks
from ..core.logs import LibraryLogger
from ..core.restore.verify import OVERWRITTEN
from ..core.storage.direct_io import Written, aligned_arrays, copy_into
from ..hdf5 import (
    DIRECT_MIN_BYTES,
    HDF5_MAGIC,
    FileImage,
    create_array,
    create_file,
    dataset,
    dataset_array,
    group,
    in_place_offset,
    reads_as_view,
    writable_bytes,
    writable_contents,
    write_file,
)
from ..hdf5_check import errors_are_the_files, load_json, open_model_file
from .fits import check_restorable, check_state, is_generator, sets_cuda_states

MODEL_FILE = "model.h5"
FORMAT_VERSION = 1
FORMAT_ATTR = "candle_ckpt_torch_format_version"
_NUMPY_PREFIX = "numpy:"
# A tensor is built in place on the bytes read only where they start on this boundary
# (what a CPU allocator guarantees); elsewhere it is copied.
_TENSOR_ALIGNMENT = 64


@dataclass(frozen=True)
class TrainingState:
    """The registered objects' state at one instant: JSON text plus numpy arrays.

    Safe to hand to another thread: nothing in it refers to a live torch object. The
    arrays are copies, or views of the tensors' memory (see `snapshot`).
    """

    state: str
    arrays: tuple
    dtypes: tuple  # torch dtype name (or "numpy:<dtype>") of each array
    shapes: tuple
    weights_only: bool
    nbytes: int


def uninitialized(objects: Mapping[str, Any]) -> list[str]:
    """ "entry.key" of every parameter or buffer a lazy module (`torch.nn.LazyLinear`...)
    has not initialised yet: it gets its shape, in place, at the module's first call."""
    return [
        f"{name}.{key}"
        for name, value in objects.items()
        if isinstance(value, torch.nn.Module)
        for key, tensor in value.state_dict().items()
        if torch.nn.parameter.is_lazy(tensor)
    ]


def object_states(objects: Mapping[str, Any], weights_only: bool) -> dict:
    """{name: state} of the objects a snapshot holds (modules only if `weights_only`)."""
    return {
        name: value.get_state() if is_generator(value) else value.state_dict()
        for name, value in objects.items()
        if not weights_only or isinstance(value, torch.nn.Module)
    }


def rng_states() -> dict:
    """The global random states: torch CPU, CUDA (when initialised), numpy, random."""
    states: dict = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def state_nbytes(objects: Mapping[str, Any], weights_only: bool) -> int:
    """The bytes a copied snapshot holds, from the tensors' sizes, copying nothing."""
    total = 0

    def count(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor) and torch.nn.parameter.is_lazy(value):
            return  # no size yet (state_exists says so)
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, Mapping):
            for item in value.values():
                count(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                count(item)

    count(object_states(objects, weights_only))
    count(rng_states())
    return total


def snapshot(
    objects: Mapping[str, Any],
    weights_only: bool = False,
    copy: bool = True,
    into: TrainingState | None = None,
) -> TrainingState:
    """Every registered object's state and the random states, now (training thread).

    With `copy`, the arrays are copies in host memory, made into `into`'s arrays (an
    older snapshot nobody reads any more) where shape and dtype match; the other large
    ones into one block of huge-page memory, each on a `direct_io.ALIGNMENT` boundary, so
    that `write` writes them with O_DIRECT from where they are. Without, CPU tensors are
    views of their memory: meant for a save written at once, before the next optimizer
    step changes them in place.
    """
    arrays: list = []
    dtypes: list = []
    shapes: list = []
    spare = into.arrays if into is not None else ()
    fresh: list[int] = []  # arrays still views, to copy into a new block

    def array_of(value: Any, path: str) -> int:
        if isinstance(value, torch.Tensor):
            if torch.nn.parameter.is_lazy(value):
                raise CheckpointFormatError(
                    f"cannot save {path}: an uninitialised parameter of a lazy module "
                    f"(torch.nn.LazyLinear...), which has no shape until the module's "
                    f"first call; call the model on a batch before the first save"
                )
            if value.layout != torch.strided or value.is_quantized:
                raise CheckpointFormatError(
                    f"cannot save {path}: a {value.layout} tensor ({value.dtype}); expected "
                    f"a dense tensor (call .to_dense() in state_dict)"
                )
            dtype = str(value.dtype).removeprefix("torch.")
            shapes.append(tuple(value.shape))
            host = value.detach().cpu().contiguous()
            try:
                array = host.numpy()
            except TypeError:  # no numpy dtype: keep the raw bytes
                array = host.reshape(-1).view(torch.uint8).numpy()
        else:
            dtype, array = _NUMPY_PREFIX + value.dtype.str, np.ascontiguousarray(value)
            shapes.append(value.shape)
        if copy:
            k = len(arrays)
            previous = spare[k] if k < len(spare) else None
            if (
                previous is not None
                and previous.shape == array.shape
                and previous.dtype == array.dtype
            ):
                previous.flags.writeable = True
                copy_into(previous, array)
                array = previous
            elif array.nbytes >= DIRECT_MIN_BYTES:
                fresh.append(len(arrays))
            else:
                array = array.copy()
        array.flags.writeable = False
        arrays.append(array)
        dtypes.append(dtype)
        return len(arrays) - 1

    encoded = {
        "objects": _encode(object_states(objects, weights_only), "state", array_of),
        "rng": _encode({} if weights_only else rng_states(), "rng", array_of),
    }
    if fresh:
        _copy_into_block(arrays, fresh)
    return TrainingState(
        json.dumps(encoded),
        tuple(arrays),
        tuple(dtypes),
        tuple(shapes),
        weights_only,
        sum(a.nbytes for a in arrays),
    )


def _copy_into_block(arrays: list, indices: list[int]) -> None:
    """Replace each `arrays[k]` of `indices` by a read-only copy carved out of one new
    block of `memory.anonymous_memory`, each starting on an ALIGNMENT boundary."""
    targets = aligned_arrays([(arrays[k].dtype, arrays[k].shape) for k in indices])
    for k, target in zip(indices, targets):
        copy_into(target, arrays[k])
        target.flags.writeable = False
        arrays[k] = target


def _encode(value: Any, path: str, array_of: Callable[[Any, str], int]) -> Any:
    """`value` as JSON-able data, its tensors and arrays replaced by their index."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray)):
        key = "tensor" if isinstance(value, torch.Tensor) else "ndarray"
        return {key: array_of(value, path)}
    if isinstance(value, np.generic):
        return _encode(value.item(), path, array_of)
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, list):
        return [_encode(item, f"{path}[{k}]", array_of) for k, item in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, f"{path}[{k}]", array_of) for k, item in enumerate(value)]}
    if isinstance(value, dict):
        items = [
            [
                _encode(key, f"{path} key {key!r}", array_of),
                _encode(item, f"{path}[{key!r}]", array_of),
            ]
            for key, item in value.items()
        ]
        if isinstance(value, collections.OrderedDict):
            metadata = getattr(value, "_metadata", None)
            return {
                "odict": items,
                "metadata": None
                if metadata is None
                else _encode(dict(metadata), f"{path}._metadata", array_of),
            }
        return {"dict": items}
    raise CheckpointFormatError(
        f"cannot save {path}: a {type(value).__module__}.{type(value).__qualname__} "
        f"({value!r:.80}); expected tensors, numpy arrays, numbers, strings, None and "
        f"lists, tuples and dicts of them (a state_dict holding other objects cannot be "
        f"restored without unpickling)"
    )


def write(
    state: TrainingState,
    path: str,
    progress: Callable[[int], None] | None = None,
    *,
    checksum: bool = True,
) -> Written:
    """Write `state` to `path` (created or truncated), in the module docstring's layout;
    return what `direct_io.write_at` wrote, with the file's CRC32 (None without
    `checksum`).

    h5py lays the file out in memory and writes the small arrays there; the layout and
    the large arrays, in the space it allocated for them, are written into the file by
    `hdf5.write_file` (with O_DIRECT where it can), which releases the GIL, so a
    background save leaves the training thread running, and which alone touches the
    file system, so a full disk never fails inside HDF5. No fsync (the protocol does
    it). `progress` is called with the bytes written through the page cache so far.

    Raises:
        OSError: the file could not be written (disk full, quota, EIO).
    """
    direct: list = []  # (dataset offset, array) of the arrays write_file writes
    image = FileImage()
    with create_file(image) as f:
        f.attrs[FORMAT_ATTR] = FORMAT_VERSION
        f.attrs["weights_only"] = state.weights_only
        f.attrs["torch_version"] = str(torch.__version__)
        # A dataset, not an attribute: HDF5 attributes hold at most 64 KiB.
        f.create_dataset("state", data=np.frombuffer(state.state.encode("utf8"), np.uint8))
        tensors = f.create_group("tensors")
        for k, (array, dtype, shape) in enumerate(zip(state.arrays, state.dtypes, state.shapes)):
            created = create_array(tensors, str(k), array, direct)
            created.attrs["torch_dtype"] = dtype
            created.attrs["shape"] = np.asarray(shape, dtype=np.int64)
    return write_file(path, image, direct, progress, checksum=checksum)


# -- reading ---------------------------------------------------------------------------


def read(contents: memoryview, path: str, in_place: InPlaceRead | None = None) -> tuple[dict, bool]:
    """The file's state ({"objects", "rng"} decoded, tensors on the CPU) and weights_only.

    `in_place` (`plan_in_place`'s, for the file these `contents` were read from) names
    the datasets read into the modules' tensors already: each decodes to the module's
    tensor itself, once the verified file is found to hold it where it was read from.

    Raises:
        CheckpointFormatError: not a candle_ckpt PyTorch file, or malformed (the
            message names what and where), or not holding the datasets of `in_place`
            where they were read from.
    """
    targets = in_place.targets if in_place is not None else {}
    with (
        errors_are_the_files(path, "a readable candle_ckpt PyTorch file"),
        open_model_file(contents, path) as f,
    ):
        encoded, weights_only = _header(f, path)
        tensors = group(f, "tensors", path)
        source = writable_contents(contents)
        values = []
        for k in range(len(tensors)):
            found = dataset(tensors, str(k), path)
            target = targets.get(k)
            if target is None:
                values.append(_tensor(found, source, path))
            elif in_place_offset(found) == target.offset and _fits(found, target.tensor):
                values.append(target.tensor)
            else:
                raise CheckpointFormatError(
                    f"'{path}' changed while it was read: dataset '{found.name}', read "
                    f"into the model's memory, is not where the file, as verified, has "
                    f"it. {OVERWRITTEN}"
                )
    state = _decoded(encoded, values, path)
    references = _references(encoded)
    for k, target in targets.items():
        saved = state["objects"].get(target.name)
        if (
            references[k] != 1
            or not isinstance(saved, dict)
            or saved.get(target.key) is not target.tensor
        ):
            raise CheckpointFormatError(
                f"'{path}' changed while it was read: dataset {k}, read into the model's "
                f"memory, is not the file's '{target.name}.{target.key}' alone. {OVERWRITTEN}"
            )
    return state, weights_only


def _header(f: h5py.File, path: str) -> tuple[Any, bool]:
    """The open file's 'state' JSON, as parsed, and its weights_only attribute, once its
    format attribute is found to be one this candle_ckpt reads."""
    if FORMAT_ATTR not in f.attrs:
        raise CheckpointFormatError(
            f"'{path}' is an HDF5 file without '{FORMAT_ATTR}': not written by "
            f"candle_ckpt's PyTorch adapter (a Keras checkpoint?)"
        )
    version = f.attrs[FORMAT_ATTR]
    if not isinstance(version, (int, np.integer)) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointFormatError(
            f"'{path}': {FORMAT_ATTR} is {version!r}; this candle_ckpt reads "
            f"versions 1 to {FORMAT_VERSION} (a newer candle_ckpt wrote it?)"
        )
    text = np.asarray(dataset(f, "state", path)[()], np.uint8).tobytes()
    encoded = load_json(text, path, "dataset 'state'")
    return encoded, bool(f.attrs.get("weights_only", False))


def _decoded(encoded: Any, values: list, path: str) -> dict:
    """The 'state' JSON `encoded` decoded, its tensor references replaced by `values`."""
    if not isinstance(encoded, dict) or set(encoded) != {"objects", "rng"}:
        found = sorted(encoded) if isinstance(encoded, dict) else encoded
        raise CheckpointFormatError(
            f"'{path}': dataset 'state' is {found!r:.80}; "
            f"expected a dict with keys ['objects', 'rng']"
        )
    state = {key: _decode(encoded[key], values, path, key) for key in ("objects", "rng")}
    if not all(isinstance(state[key], dict) for key in state):
        raise CheckpointFormatError(
            f"'{path}': 'objects' and 'rng' of dataset 'state' "
            f"are {[type(v).__name__ for v in state.values()]}; "
            f"expected dicts"
        )
    return state


@dataclass(frozen=True)
class _Layout:
    """What a dataset decodes to, from its attributes, checked against the dataset."""

    dtype: Any  # torch.dtype of a tensor, np.dtype of an array ("numpy:" prefix)
    shape: tuple[int, ...]
    raw: bool  # a tensor's bytes as uint8 (a dtype numpy lacks, e.g. bfloat16)

    @property
    def is_array(self) -> bool:
        return isinstance(self.dtype, np.dtype)


def _layout(found: h5py.Dataset, path: str) -> _Layout:
    """The dataset's `_Layout`, once its attributes (torch_dtype, shape) are found to
    be ones `snapshot` writes and to describe the dataset itself: its dtype, byte order
    and shape. Reads no values.

    Raises:
        CheckpointFormatError: they are not; names the dataset.
    """
    name = found.attrs.get("torch_dtype", "")
    name = name.decode("utf8", "replace") if isinstance(name, bytes) else str(name)
    attr = np.asarray(found.attrs.get("shape", np.zeros(0, np.int64)))
    if attr.ndim != 1 or attr.dtype.kind not in "iu" or (attr < 0).any():
        raise CheckpointFormatError(
            f"'{path}': dataset '{found.name}': attribute shape is {attr!r:.80}; "
            f"expected a list of sizes"
        )
    shape = tuple(int(n) for n in attr)
    stored = (found.dtype, found.shape)
    if name.startswith(_NUMPY_PREFIX):
        try:
            expected = np.dtype(name[len(_NUMPY_PREFIX) :])
        except (TypeError, ValueError):
            expected = None
        if expected is None or expected.hasobject or stored != (expected, shape):
            raise CheckpointFormatError(
                f"'{path}': dataset '{found.name}' is {stored[0]} {stored[1]}; its "
                f"attributes say {name[:40]!r} {shape}"
            )
        return _Layout(expected, shape, raw=False)
    known = _torch_dtype(name)
    if known is None:
        raise CheckpointFormatError(
            f"'{path}': dataset '{found.name}': attribute torch_dtype is {name[:40]!r}; "
            f"expected a torch dtype name such as 'float32'"
        )
    dtype, itemsize, native = known
    if native is not None and stored == (native, shape):
        return _Layout(dtype, shape, raw=False)
    if stored == (np.dtype(np.uint8), (int(np.prod(shape)) * itemsize,)):
        return _Layout(dtype, shape, raw=True)
    raise CheckpointFormatError(
        f"'{path}': dataset '{found.name}' is {stored[0]} {stored[1]}; expected {name} of "
        f"shape {shape}" + (f" ({native}, this machine's byte order)" if native else "")
    )


@functools.lru_cache(maxsize=64)
def _torch_dtype(name: str) -> tuple[torch.dtype, int, np.dtype | None] | None:
    """The torch dtype of that name as (dtype, bytes per element, its numpy dtype or
    None), if it is one `snapshot` writes (not quantized), else None."""
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    try:
        if not isinstance(dtype, torch.dtype) or torch.empty(0, dtype=dtype).is_quantized:
            return None
        itemsize = torch.empty((), dtype=dtype).element_size()
    except (TypeError, RuntimeError):
        return None
    try:
        native = torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:  # no numpy dtype: `snapshot` writes the bytes
        native = None
    return dtype, itemsize, native


def _tensor(found: h5py.Dataset, contents: memoryview, path: str) -> Any:
    """A dataset as the torch tensor (or numpy array) it was, checked against its attrs.

    A tensor is built on `contents` in place where they are writable (see
    `hdf5.writable_contents`) and the dataset starts on a _TENSOR_ALIGNMENT boundary
    (the large ones: `hdf5.create_file`), else on a copy. The modules'
    `load_state_dict` then copies them into the parameters, and the optimizer's keeps
    them as its state.
    """
    layout = _layout(found, path)
    return _built(dataset_array(found, contents, path), layout, found, path)


def _built(array: np.ndarray, layout: _Layout, found: h5py.Dataset, path: str) -> Any:
    """The tensor (or array) of `layout` on `array`, the values of dataset `found`."""
    if (array.dtype, array.shape) != (found.dtype, found.shape):
        raise CheckpointFormatError(
            f"'{path}': dataset '{found.name}' reads as {array.dtype} {array.shape}, "
            f"not as the {found.dtype} {found.shape} it declares"
        )
    if layout.is_array:
        return array.copy()
    if not array.flags.writeable or array.ctypes.data % _TENSOR_ALIGNMENT:
        array = array.copy()
    tensor = torch.from_numpy(array)
    if layout.raw:
        tensor = tensor.view(layout.dtype)
    return tensor.reshape(layout.shape)


def _decode(value: Any, values: list, path: str, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(item, values, path, f"{where}[{k}]") for k, item in enumerate(value)]
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise CheckpointFormatError(
            f"'{path}': {where} is {value!r:.80}; expected a "
            f"tagged value (see candle_ckpt.pytorch.state)"
        )
    tag, body = next(iter(value.items()))
    if tag in ("tensor", "ndarray"):
        if type(body) is not int or not 0 <= body < len(values):
            raise CheckpointFormatError(
                f"'{path}': {where} refers to tensor {body!r}; the file has {len(values)}"
            )
        found = values[body]
        if isinstance(found, torch.Tensor) != (tag == "tensor"):
            raise CheckpointFormatError(f"'{path}': {where}: dataset {body} is not a {tag}")
        return found
    if tag == "dtype" and isinstance(getattr(torch, str(body), None), torch.dtype):
        return getattr(torch, body)
    if tag == "tuple" and isinstance(body, list):
        return tuple(_decode(item, values, path, f"{where}[{k}]") for k, item in enumerate(body))
    if tag in ("dict", "odict") and isinstance(body, list):
        result: dict = {} if tag == "dict" else collections.OrderedDict()
        for item in body:
            if not isinstance(item, list) or len(item) != 2:
                raise CheckpointFormatError(
                    f"'{path}': {where} holds {item!r:.80}; expected [key, value] pairs"
                )
            key = _decode(item[0], values, path, f"{where} key")
            if not _is_key(key):
                raise CheckpointFormatError(
                    f"'{path}': {where} has a key {key!r:.80}; expected a number, a "
                    f"string, None or a tuple of them"
                )
            result[key] = _decode(item[1], values, path, f"{where}[{key!r:.80}]")
        if tag == "odict" and value.get("metadata") is not None:
            metadata = _decode(value["metadata"], values, path, f"{where}._metadata")
            if not isinstance(metadata, dict):
                raise CheckpointFormatError(
                    f"'{path}': {where}._metadata is {metadata!r:.80}; expected a dict"
                )
            result._metadata = collections.OrderedDict(metadata)  # type: ignore[attr-defined]
        return result
    raise CheckpointFormatError(
        f"'{path}': {where} is {value!r:.80}; expected a tagged "
        f"value (tensor, ndarray, tuple, dict, odict, dtype)"
    )


def _is_key(key: Any) -> bool:
    """Whether a decoded dict key is one `snapshot` writes: hashable, never a tensor."""
    if isinstance(key, tuple):
        return all(_is_key(item) for item in key)
    return key is None or isinstance(key, (bool, int, float, str, torch.dtype))


def _references(encoded: Any) -> collections.Counter[int]:
    """How many times the 'state' JSON `encoded` refers to each dataset (counting any
    "tensor" or "ndarray" key, so never fewer times than `_decode` uses it)."""
    counts: collections.Counter[int] = collections.Counter()
    pending = [encoded]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            counts.update(
                v for k, v in value.items() if k in ("tensor", "ndarray") and type(v) is int
            )
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return counts


def _placeholder(found: h5py.Dataset, path: str) -> Any:
    """A dataset as `_tensor` would decode it, for every check but of its values: a
    tensor of its dtype and shape on the meta device (no memory), or a read-only array
    of its dtype and shape that holds one item."""
    layout = _layout(found, path)
    if layout.is_array:
        return np.broadcast_to(np.zeros((), layout.dtype), layout.shape)
    return torch.empty(layout.shape, dtype=layout.dtype, device="meta")


# -- reading into the modules' own memory ----------------------------------------------


@dataclass(frozen=True)
class InPlaceTarget:
    """A module tensor that a restart reads its dataset straight into."""

    offset: int  # of the dataset in the file
    name: str  # the registered module's entry
    key: str  # the tensor's key in the module's state dict
    tensor: torch.Tensor  # the state dict's tensor: the module's memory itself
    buffer: np.ndarray  # that memory as writable bytes


@dataclass(frozen=True)
class InPlaceRead:
    """The datasets a restart reads from `path` straight into the modules' tensors
    (`plan_in_place`): no new memory to fault in, no copy for load_state_dict."""

    path: str
    targets: dict[int, InPlaceTarget]  # dataset index -> where it is read

    @property
    def regions(self) -> list[tuple[int, np.ndarray]]:
        return [(target.offset, target.buffer) for target in self.targets.values()]


def plan_in_place(objects: Mapping[str, Any], path: str, stream: BinaryIO) -> InPlaceRead:
    """Which datasets of the candle_ckpt file open as `stream` a restart can read
    straight into the registered modules' tensors, and where: every large contiguous
    one (`hdf5.in_place_offset`) that the file refers to once, as a module's
    state-dict entry whose tensor is dense CPU memory of its own (`_own_buffer`).

    Reads the file's metadata and the datasets of its random states, and changes
    nothing. The whole plan is checked first: every dataset `read` will read, against
    its attributes (`_layout`) and where it is stored (`_as_read`), and the whole state
    against the objects, as `restore` checks it (`check_restorable`; tensors but the
    random states without their values): a file that `restore` would refuse, or that
    it cannot read, gets no target, so no tensor is written before the file is
    refused. `checksum.read_file` writes the tensors once the file has verified, and
    `read` then decodes those entries to the tensors themselves, so that
    load_state_dict copies nothing onto them. A tensor two entries share (tied
    weights) is read into for the first only; the second is loaded after it, as before.
    """
    plan = InPlaceRead(path, {})
    try:
        size = os.fstat(stream.fileno()).st_size
        with open_model_file(stream, path) as f:
            encoded, weights_only = _header(f, path)
            tensors = group(f, "tensors", path)
            datasets = [dataset(tensors, str(k), path) for k in range(len(tensors))]
            values = [_as_read(found, size, path) for found in datasets]
            state = _decoded(encoded, values, path)
            index = {id(value): k for k, value in enumerate(values)}
            # The checks set the random states on scratch generators: read their values
            # (those of a size no state has are refused for it, values or not).
            valued = [
                index[id(v)]
                for v in _random_states(objects, state)
                if id(v) in index and datasets[index[id(v)]].nbytes < DIRECT_MIN_BYTES
            ]
            if valued:
                for number in valued:
                    found = datasets[number]
                    layout = _layout(found, path)
                    values[number] = _built(np.asarray(found[()]), layout, found, path)
                state = _decoded(encoded, values, path)
                index = {id(value): k for k, value in enumerate(values)}
            check_restorable(objects, state, weights_only, path)
            references = _references(encoded)
            taken: set[int] = set()
            for name, module in objects.items():
                if not isinstance(module, torch.nn.Module):
                    continue
                for key, tensor in module.state_dict().items():
                    k = index.get(id(state["objects"][name][key]))
                    if k is None or references[k] != 1 or not _fits(datasets[k], tensor):
                        continue
                    offset = in_place_offset(datasets[k])
                    buffer = _own_buffer(tensor) if offset is not None else None
                    if offset is not None and buffer is not None and tensor.data_ptr() not in taken:
                        taken.add(tensor.data_ptr())
                        plan.targets[k] = InPlaceTarget(offset, name, key, tensor, buffer)
    except Exception:  # `restore` says what is wrong with the file
        return InPlaceRead(path, {})
    return plan


def _as_read(found: h5py.Dataset, size: int, path: str) -> Any:
    """Dataset `found` of a file of `size` bytes as a `_placeholder`, once `read` is
    found to read it as it is stored (`hdf5.reads_as_view`), which cannot fail."""
    if not reads_as_view(found, size):
        raise CheckpointFormatError(
            f"'{path}': dataset '{found.name}' is not one run of bytes inside the file"
        )
    return _placeholder(found, path)


def _random_states(objects: Mapping[str, Any], state: dict) -> Iterator[Any]:
    """The tensors and arrays of the decoded `state` that hold random states (its
    'rng', and the entries of registered generators): the only ones whose values the
    checks read."""
    pending = [state["rng"]]
    pending += [state["objects"].get(name) for name, obj in objects.items() if is_generator(obj)]
    while pending:
        value = pending.pop()
        if isinstance(value, (torch.Tensor, np.ndarray)):
            yield value
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)


def _fits(found: h5py.Dataset, tensor: torch.Tensor) -> bool:
    """Whether the dataset holds a tensor of `tensor`'s dtype and shape, byte for byte."""
    return (
        str(found.attrs.get("torch_dtype", "")) == str(tensor.dtype).removeprefix("torch.")
        and tuple(int(n) for n in found.attrs.get("shape", ())) == tuple(tensor.shape)
        and found.size * found.dtype.itemsize == tensor.numel() * tensor.element_size()
    )


def _own_buffer(tensor: torch.Tensor) -> np.ndarray | None:
    """`tensor`'s memory as writable bytes, where it is dense CPU memory that is the
    whole of its storage: two such tensors then share all their memory or none."""
    nbytes = tensor.numel() * tensor.element_size()
    if (
        torch.nn.parameter.is_lazy(tensor)
        or tensor.device.type != "cpu"
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or tensor.is_conj()
        or tensor.is_neg()
        or not tensor.is_contiguous()
        or tensor.storage_offset() != 0
        or tensor.untyped_storage().nbytes() != nbytes
    ):
        return None
    return writable_bytes(tensor.data_ptr(), nbytes)


# -- restoring -------------------------------------------------------------------------


def apply(objects: Mapping[str, Any], state: dict, path: str, logger: LibraryLogger) -> None:
    """Load `state`, checked by `check_restorable`, into the objects and the global
    random generators.

    Modules first: loading one materialises its lazy parameters, which an optimizer's
    `load_state_dict` needs to cast its state to (their dtype and device). What the
    checks pass loads whole; should an object fail all the same (its own
    `load_state_dict` refusing what torch's would take), the error says which entries
    were loaded already.
    """
    entries = sorted(
        state["objects"].items(), key=lambda item: not isinstance(objects[item[0]], torch.nn.Module)
    )
    loaded: list[str] = []
    for name, saved in entries:
        obj = objects[name]
        with _loading(name, loaded, path):
            if is_generator(obj):
                obj.set_state(saved)
            else:
                obj.load_state_dict(saved)
        loaded.append(name)
    rng = state["rng"]
    if not rng:
        return
    with _loading("rng", loaded, path):
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and sets_cuda_states(rng["cuda"]):
            torch.cuda.set_rng_state_all(rng["cuda"])
    if "cuda" in rng and not sets_cuda_states(rng["cuda"]):
        logger.warning(
            "'%s' holds the random states of %d CUDA devices, this process "
            "sees %d: CUDA random streams are not restored",
            path,
            len(rng["cuda"]),
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )


@contextlib.contextmanager
def _loading(name: str, loaded: list[str], path: str) -> Iterator[None]:
    """Raise an error of an object's own loading of entry `name` as a
    CheckpointFormatError saying what is loaded already (`loaded`)."""
    try:
        yield
    except Exception as error:
        loaded_before = str(loaded or "nothing")
        raise failed_after_checks(path, f"entry '{name}'", error, loaded_before) from error


def restore(
    objects: Mapping[str, Any],
    path: str,
    contents: memoryview,
    logger: LibraryLogger,
    in_place: InPlaceRead | None = None,
    overwritten: Set[str] = frozenset(),
) -> Restored:
    """Load the verified file `contents` (of `path`) into the registered `objects`.

    Every entry is decoded and checked against its object (`check_restorable`) before
    the first `load_state_dict`, so on any CheckpointFormatError nothing has changed
    (but for what `in_place`, the plan `contents` were read by, read into the modules
    already: `read` says so if the verified file does not hold it). A file that is not
    HDF5 is taken for upstream CANDLE's torch pickle (`restore_upstream`); `overwritten`
    names the modules a file that failed verification was read into, which it must load.
    """
    if bytes(contents[: len(HDF5_MAGIC)]) != HDF5_MAGIC:
        return restore_upstream(objects, path, contents, overwritten)
    state, weights_only = read(contents, path, in_place)
    wanted = check_restorable(objects, state, weights_only, path)
    apply(objects, state, path, logger)
    return Restored.of(
        wanted,
        rng_restored=bool(state["rng"]),
        exact=not weights_only,
        missing="optimizer, scheduler or RNG state (ckpt_save_weights_only)",
    )


UPSTREAM_KEYS = {"model": "model_state_dict", "optimizer": "optimizer_state_dict"}


def load_upstream(path: str, contents: memoryview) -> dict:
    """Upstream CANDLE's ``model.h5`` torch pickle, read with `torch.load(weights_only=True)`.

    Its unpickler builds tensors and plain containers only: a file asking for any other
    object (a `__reduce__` payload) is refused before anything is built from it.

    Raises:
        CheckpointFormatError: not such a pickle, or not upstream's dict with
            'model_state_dict'.
    """
    try:
        loaded = torch.load(io.BytesIO(contents), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(
            f"'{path}' is a pickle that asks for objects other than tensors and plain "
            f"containers (the safe loader refused it: {str(error).splitlines()[0][:300]}); "
            f"it was not loaded, since a full unpickling could run code from the file. "
            f"Do not restart from it"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointFormatError(
            f"'{path}' is neither a candle_ckpt PyTorch file (HDF5) nor a readable "
            f"torch.save file: {error}"
        ) from None
    if not isinstance(loaded, dict) or UPSTREAM_KEYS["model"] not in loaded:
        found = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise CheckpointFormatError(
            f"'{path}' is a torch.save file holding {found}; expected upstream CANDLE's "
            f"dict with 'model_state_dict' (and 'optimizer_state_dict')"
        )
    return loaded


def restore_upstream(
    objects: Mapping[str, Any],
    path: str,
    contents: memoryview,
    overwritten: Set[str] = frozenset(),
) -> Restored:
    """Restore the weights and optimizer of upstream CANDLE's ``model.h5`` torch pickle
    (read by `load_upstream`, which never unpickles anything but tensors), provided it
    loads every module of `overwritten` (see `restore`)."""
    loaded = load_upstream(path, contents)
    plan = [(name, key) for name, key in UPSTREAM_KEYS.items() if name in objects and key in loaded]
    if not plan or plan[0][0] != "model":
        raise CheckpointFormatError(
            f"'{path}' is an upstream CANDLE checkpoint of a model "
            f"and optimizer; set_model registered no 'model'"
        )
    if overwritten - {name for name, _ in plan}:
        raise CheckpointFormatError(
            f"'{path}' does not load every module that a model file which failed "
            f"verification was read into ({sorted(overwritten)}). {OVERWRITTEN}"
        )
    for name, key in plan:
        check_state(name, objects[name], loaded[key], path)
    for name, key in plan:
        objects[name].load_state_dict(loaded[key])
    lacking = [name for name in objects if name not in dict(plan)] + ["RNG"]
    return Restored(
        parts=tuple(name for name, _ in plan),
        exact=False,
        missing=" or ".join(lacking) + " state (upstream CANDLE saves none)",
        source="upstream CANDLE torch pickle, read with torch.load(weights_only=True)",
    )


def saved_module_states(path: str, contents: memoryview) -> dict[str, Any]:
    """{entry name: state dict} of every module a verified model file holds.

    A candle_ckpt file: the entries saved as a module's state dict (an OrderedDict, as
    `Module.state_dict` returns; optimizers, schedulers and generators are not). An
    upstream CANDLE torch pickle: its 'model_state_dict', as entry "model".
    """
    if bytes(contents[: len(HDF5_MAGIC)]) != HDF5_MAGIC:
        return {"model": load_upstream(path, contents)[UPSTREAM_KEYS["model"]]}
    state, _ = read(contents, path)
    return {
        name: saved
        for name, saved in state["objects"].items()
        if isinstance(saved, collections.OrderedDict)
    }


def restore_modules(objects: Mapping[str, Any], path: str, contents: memoryview) -> Restored:
    """Load only the weights of the registered modules from the verified file `contents`
    (a warm start, `ckpt_init_from`): each `torch.nn.Module` from the entry of its name;
    optimizers, schedulers, generators and random states are left as they are.

    Every module is checked against its entry before the first `load_state_dict`.
    """
    modules = {name: value for name, value in objects.items() if isinstance(value, torch.nn.Module)}
    if not modules:
        raise CheckpointFormatError(
            f"set_model registered no torch.nn.Module to load the weights of '{path}' into"
        )
    saved = saved_module_states(path, contents)
    missing = sorted(set(modules) - set(saved))
    if missing:
        raise CheckpointFormatError(
            f"'{path}' holds the weights of modules {sorted(saved)}; set_model registered "
            f"modules {sorted(modules)}, of which {missing} are not in the file. Register "
            f"the model under the name the parent run used"
        )
    for name, module in modules.items():
        check_state(name, module, saved[name], path)
    for name, module in modules.items():
        module.load_state_dict(saved[name])
    return Restored(
        parts=tuple(modules),
        exact=False,
        missing="optimizer, scheduler or RNG state (a warm start loads weights only)",
    )


def write_module_weights(contents: memoryview, source: str, destination: str) -> str:
    """Write the model's state dict from the verified model file `contents` (of `source`)
    with `torch.save` at `destination`, for plain
    `net.load_state_dict(torch.load(destination, weights_only=True))`. Does not fsync.

    The entry registered as "model" is written, else the file's only module.

    Returns:
        The name of the entry written.

    Raises:
        CheckpointFormatError: the file is unreadable, or holds no module or several
            without one named "model".
    """
    modules = saved_module_states(source, contents)
    if "model" in modules:
        name = "model"
    elif len(modules) == 1:
        name = next(iter(modules))
    else:
        raise CheckpointFormatError(
            f"'{source}' holds the state dicts of modules {sorted(modules)}; none is "
            f"registered as 'model', so which one to export is not known"
            if modules
            else f"'{source}' holds no module state dict to export"
        )
    torch.save(modules[name], destination)
    return name
