"""A model file checked against what candle_ckpt writes, before this process parses it.

A model file is HDF5 of one narrow shape, whatever wrote it (the Keras and the
PyTorch adapter, or upstream CANDLE's Keras `model.save`): superblock version 0, a tree
of groups joined by hard links, attributes of numbers and strings, and datasets of
numbers stored uncompressed as one contiguous run of bytes inside the file.
`open_model_file` refuses anything else before the file's data is read, so that what
reading costs is bounded by the file itself, and a file the HDF5 library cannot parse
ends in a refusal rather than in the process:

1. The superblock (the first 96 bytes) is read in Python, without the HDF5 library:
   version, field sizes, base and end-of-file addresses, root object address.
2. The whole object tree is then walked by h5py in a checker process (this Python,
   started afresh: a fork would copy the page tables of a process holding a model,
   and make its every page copy-on-write), which reads the file's bytes from this
   process through a pipe, as HDF5 asks for them (its headers, not the data), under
   a cap on the memory it may take (RLIMIT_AS: what it has plus CHILD_MEMORY_BYTES)
   and a time limit (CHECK_SECONDS). It visits every group, dataset and attribute the
   way the readers do: iterating, then looking up each name found, and every name a
   reader may look up that a group may lack (`LOOKED_UP`, the names its attributes
   list, "0" to "n-1" in a group of n members); it reads every attribute and checks
   every dataset's storage (`_dataset_problem`). A crash of the HDF5 library on a
   damaged header (a segfault, an endless loop, an allocation the cap refuses) thus
   ends the checker, and the file is refused naming it; HDF5 parses the same bytes
   the same way in this process afterwards, so only a file that the checker walked
   to the end is opened here.

3. `list_model_file` has the checker do that walk with h5py's low-level interface
   (each object opened from its group; no name looked up, since nothing will be) and
   send back the file's tree: every group's attributes and every dataset's offset,
   shape and dtype, as JSON (`Listing`). A reader of the listing (the Keras restart)
   never parses the file with HDF5 in this process at all: it takes what it needs
   from the listing and the values from the verified bytes by offset. The pieces of
   the file the checker read are kept as CRC32s (`Reads`), so that a listing made
   from one read of a file serves a second read holding the same bytes there.

`load_json` bounds a JSON text held in a model file (size, nesting depth, string
lengths) before it is parsed, so that what it decodes to stays in proportion to it.

docs/THREATS.md says what this defends against and what it does not.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import math
import mmap
import os
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .core.errors import CheckpointFormatError
from .core.storage.checksum import crc32
from .core.text import printable
from .hdf5 import HDF5_MAGIC, InMemoryFile

CHECK_SECONDS = 60.0
"""How long the checker may take to walk a file; a walk that takes longer is taken for
an endless loop in the HDF5 library, and the file is refused."""

CHILD_MEMORY_BYTES = 256 << 20
"""What the checker may allocate (RLIMIT_AS, over what it has once started)."""

IDLE_SECONDS = 30.0
"""How long the checker waits for another file before it exits."""

LOOKED_UP = (
    "model_weights",
    "top_level_model_weights",
    "optimizer_weights",
    "candle_ckpt_rng",
    "candle_ckpt_steps",
    "state",
    "tensors",
)
"""Group members the readers look up by name whether or not the file has them (a
lookup of an absent name walks the group's index along a path iteration does not)."""

# Dataset element kinds the adapters write: bool, integers, floats, complex.
_NUMBER_KINDS = "biufc"

_SUPERBLOCK = struct.Struct("<8sBBBBBBBBHHIQQQQQQ")
_UNDEFINED = 0xFFFFFFFFFFFFFFFF  # HDF5's undefined address
_MESSAGE_BYTES = 4096  # of a refusal, sent from the checker
_REQUEST = struct.Struct("<QQ")  # a read the checker asks for: offset, length
_COUNT = struct.Struct("<Q")  # the bytes that follow
_PLACES_PER_MESSAGE = 64  # datasets' places the checker sends at once
_PLACE_BYTES = 1024  # a place as JSON: an offset, at most 32 dimensions and a dtype
_CHECK, _LIST = b"C", b"L"  # what the checker is asked for: a verdict, or the listing too
_BLOCK_BYTES = 64 << 10
_CACHED_BLOCKS = 1024


@contextlib.contextmanager
def errors_are_the_files(path: str, expected: str) -> Iterator[None]:
    """Any error raised while reading the model file `path` is the file's: a
    CheckpointFormatError saying it is not `expected` ("a readable ... file"), with
    the error's printable start; a CheckpointFormatError passes as it is."""
    try:
        yield
    except CheckpointFormatError:
        raise
    except Exception as error:
        raise CheckpointFormatError(
            f"'{path}' is not {expected}: {type(error).__name__}: {printable(str(error)[:300])}"
        ) from error


def open_model_file(source: Any, path: str) -> h5py.File:
    """The model file `source` (its bytes, or a binary file open on it) opened by h5py
    for reading, once `check` found it to be a file candle_ckpt writes.

    Raises:
        CheckpointFormatError: it is not (names `path` and what is wrong).
    """
    contents = _bytes_of(source, path)
    check(contents, path)
    return h5py.File(InMemoryFile(contents), "r")


def check(contents: Any, path: str) -> None:
    """Raise CheckpointFormatError unless `contents` are an HDF5 file of the shape
    candle_ckpt writes (module docstring), found so by the checker process, which
    parsed them to the end without crashing, hanging or running out of memory."""
    _verdict(contents, path, _CHECK)


@dataclass(frozen=True)
class Listing:
    """What `list_model_file` found: the file's tree, and the pieces of the file the
    checker read to find it (`Reads`)."""

    root: ListedGroup
    reads: Reads


@dataclass(frozen=True)
class Reads:
    """The pieces of a file of `size` bytes the checker read, as (offset, length,
    CRC32 of their bytes): HDF5 made the listing from these bytes alone, so a file
    whose bytes are the same there has the same listing."""

    size: int
    pieces: tuple[tuple[int, int, int], ...]

    def found_in(self, contents: Any, regions: Sequence[tuple[int, Any]] = ()) -> bool:
        """Whether the file read as `contents`, but for `regions` ((offset, buffer):
        the parts read elsewhere, left out of `contents`, not overlapping), holds
        the same bytes in every piece."""
        if len(contents) != self.size:
            return False
        view = memoryview(contents).cast("B")
        placed = sorted((offset, memoryview(buffer).cast("B")) for offset, buffer in regions)
        starts = [offset for offset, _ in placed]
        for offset, length, crc in self.pieces:
            if _crc32_of(view, placed, starts, offset, offset + length) != crc:
                return False
        return True


def _crc32_of(
    view: memoryview,
    placed: list[tuple[int, memoryview]],
    starts: list[int],
    start: int,
    stop: int,
) -> int:
    """The CRC32 of bytes `start` to `stop` of a file: from `placed` ((offset, bytes),
    in file order, `starts` their offsets) where one lies, else from `view`."""
    crc, position = 0, start
    k = max(0, bisect.bisect_right(starts, start) - 1)
    while position < stop:
        if k < len(placed) and placed[k][0] + len(placed[k][1]) <= position:
            k += 1
            continue
        if k < len(placed) and placed[k][0] <= position:
            offset, buffer = placed[k]
            end = min(stop, offset + len(buffer))
            crc = crc32(buffer[position - offset : end - offset], crc)
        else:
            end = min(stop, placed[k][0]) if k < len(placed) else stop
            crc = crc32(view[position:end], crc)
        position = end
    return crc


def list_model_file(source: Any, path: str, found: Callable[[Any], None] | None = None) -> Listing:
    """The tree of the model file `source` (its bytes, or a binary file open on it), as
    the checker process found it walking the file: every group and dataset with its
    attributes, and where each dataset's values are. This process never parses the
    file with HDF5: a reader that takes what it needs from the listing, and the
    values from `source` by offset (`StoredArray.array`), costs no HDF5 lookup.

    The checker refuses what `check` refuses, but does not look up names the
    attributes hold (nothing is looked up by name in HDF5 here), nor read the filter
    pipeline of a contiguous dataset (HDF5 applies none to one, `_stored`).

    `found`, if given, is called in this thread while the checker walks on, with
    [offset, shape, dtype] (JSON data) of each dataset it found stored as `check`
    requires: for work that may start before the verdict (nothing may reach a model
    before it, and a file refused later may have had good datasets first).

    Raises:
        CheckpointFormatError: the file is not one candle_ckpt reads (names `path`).
    """
    contents = _bytes_of(source, path)
    pieces: dict[int, tuple[int, int, int]] = {}
    listing = _verdict(contents, path, _LIST, pieces, found)
    try:
        root = _listed_tree(json.loads(listing.decode("ascii")), path)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        _refuse(path, f"the checker's listing of it is malformed ({type(error).__name__})")
        raise AssertionError("unreachable") from error
    return Listing(root, Reads(len(contents), tuple(pieces.values())))


@dataclass(frozen=True)
class StoredArray:
    """A dataset of a listed model file (`list_model_file`): its values are `nbytes`
    at `offset` of the file (which the checker found inside it), numbers of `dtype`
    in this machine's byte order."""

    name: str  # its path in the file, from "/"
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    attrs: dict[str, Any]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def array(self, contents: Any, path: str) -> np.ndarray:
        """Its values: a view of `contents`, the file's bytes (`path` names it)."""
        if self.offset + self.nbytes > len(contents):
            raise CheckpointFormatError(
                f"'{path}': dataset '{self.name}' ({self.nbytes} bytes at offset "
                f"{self.offset}) extends past the end of the file ({len(contents)} bytes)"
            )
        return np.frombuffer(contents, self.dtype, self.size, self.offset).reshape(self.shape)


@dataclass(frozen=True)
class ListedGroup:
    """A group of a listed model file: its attributes (`_listed_value`: numbers as
    numpy scalars or arrays, strings as str or lists of str) and its members."""

    name: str  # its path in the file, from "/"
    attrs: dict[str, Any]
    members: dict[str, ListedGroup | StoredArray]

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def group(self, name: str, path: str) -> ListedGroup:
        """The group `name` ("a/b": parts below this one) of the file `path`."""
        found = self._follow(name, path)
        if not isinstance(found, ListedGroup):
            raise CheckpointFormatError(f"'{path}': '{found.name}' is a dataset, expected a group")
        return found

    def dataset(self, name: str, path: str) -> StoredArray:
        """The dataset `name` ("a/b": parts below this one) of the file `path`."""
        found = self._follow(name, path)
        if not isinstance(found, StoredArray):
            raise CheckpointFormatError(f"'{path}': '{found.name}' is a group, expected a dataset")
        return found

    def _follow(self, name: str, path: str) -> ListedGroup | StoredArray:
        node: ListedGroup | StoredArray = self
        for part in name.split("/"):
            if not isinstance(node, ListedGroup) or part not in node.members:
                raise CheckpointFormatError(
                    f"'{path}': no '{name}' under '{self.name}' (stopped at "
                    f"'{node.name}': no entry '{part}')"
                )
            node = node.members[part]
        return node


def _listed_tree(listing: dict[str, Any], path: str) -> ListedGroup:
    """The root of the tree `_list_objects` listed."""
    groups: dict[str, ListedGroup] = {}
    for member, attributes in listing["groups"].items():
        group = ListedGroup(f"/{member}", _attributes(attributes), {})
        if member:
            parent, _, name = member.rpartition("/")
            groups[parent].members[name] = group
        groups[member] = group
    for member, (offset, shape, dtype, attributes) in listing["datasets"].items():
        parent, _, name = member.rpartition("/")
        stored = np.dtype(dtype)
        if stored.kind not in _NUMBER_KINDS or not stored.isnative or stored.fields:
            raise ValueError(f"dataset '{member}' of type {dtype}")
        groups[parent].members[name] = StoredArray(
            f"/{member}", int(offset), tuple(int(n) for n in shape), stored, _attributes(attributes)
        )
    return groups[""]


def _attributes(listed: dict[str, Any]) -> dict[str, Any]:
    """Attributes as `_listed_value` lists them, as h5py would read them."""
    types = {"b": np.bool_, "i": np.int64, "f": np.float64}
    attributes: dict[str, Any] = {}
    for name, (kind, value) in listed.items():
        if kind == "s":
            attributes[name] = value if isinstance(value, str) else [str(v) for v in value]
        elif isinstance(value, list):
            attributes[name] = np.array(value, types[kind])
        else:
            attributes[name] = types[kind](value)
    return attributes


def prestart() -> None:
    """Start the checker process now, if none is running, so that the first check of a
    job (a restart) does not wait for it to start: it starts while the restart finds
    and verifies the checkpoint."""
    with _checker_lock:
        _running_checker()


def _verdict(
    contents: Any,
    path: str,
    mode: bytes,
    pieces: dict[int, tuple[int, int, int]] | None = None,
    found: Callable[[Any], None] | None = None,
) -> bytes:
    """The checker's verdict on `contents` in `mode` (`_CHECK`, `_LIST`): what it
    sent with a good verdict (the listing, or nothing); CheckpointFormatError else.
    `pieces`, if given, gets (offset, length, CRC32) of each piece the checker read,
    by offset; `found` is called as `list_model_file` says."""
    view = memoryview(contents).cast("B")
    _check_superblock(view, path)
    with _checker_lock:
        finished, problem, status, sent = _checked(view, mode, pieces, found)
    if not finished:
        _refuse(path, f"parsing it did not end within {CHECK_SECONDS:g} s (a loop in its headers)")
    if status is not None and status < 0:
        name = signal.Signals(-status).name
        _refuse(path, f"the HDF5 library crashed ({name}) parsing its headers")
    if problem is None:
        _refuse(path, f"checking it ended with status {status} and no verdict")
    if problem:
        _refuse(path, problem)
    return sent


# The checker process, kept between checks (a restart checks a file twice when it reads
# it into the model's memory); it exits after IDLE_SECONDS without one.
_checker: subprocess.Popen[bytes] | None = None
_checker_parent = 0  # the pid of the process that started it
_checker_lock = threading.Lock()


def _running_checker() -> subprocess.Popen[bytes]:
    """The checker process, started if there is none (under _checker_lock)."""
    global _checker, _checker_parent
    # A forked process inherits the checker without being its parent: it cannot
    # poll it, and learns whether it still runs from the pipe.
    if _checker is None or (_checker_parent == os.getpid() and _checker.poll() is not None):
        _checker_parent = os.getpid()
        _checker = subprocess.Popen(
            _child_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
    return _checker


def _checked(
    view: memoryview,
    mode: bytes,
    pieces: dict[int, tuple[int, int, int]] | None = None,
    found: Callable[[Any], None] | None = None,
) -> tuple[bool, str | None, int | None, bytes]:
    """(whether the checker finished in time, its verdict on `view`: "" for a good
    file, the problem, or None when it ended without one; its exit status if it ended;
    what it sent with a good verdict in `mode`)."""
    global _checker
    while True:
        checker = _running_checker()
        assert checker.stdin is not None and checker.stdout is not None
        finished, started, problem, sent = _serve(
            checker.stdin.fileno(), checker.stdout.fileno(), view, mode, pieces, found
        )
        if finished and problem is not None:
            return True, problem, None, sent
        _checker = None
        if checker.poll() is None:
            checker.kill()
        checker.stdin.close()
        checker.stdout.close()
        status = checker.wait()
        if finished and not started and status == 0:
            continue  # it had just exited, idle: a new one checks the file
        return finished, None, status, b""


def _child_command() -> list[str]:
    """The checker: this Python, isolated from the environment, importing this package
    from where this process has it."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (
        f"import sys; sys.path.insert(0, {package_parent!r}); "
        f"from candle_ckpt.hdf5_check import child_main; child_main()"
    )
    return [sys.executable, "-I", "-c", script]


def _serve(
    to_child: int,
    from_child: int,
    view: memoryview,
    mode: bytes,
    pieces: dict[int, tuple[int, int, int]] | None,
    found: Callable[[Any], None] | None,
) -> tuple[bool, bool, str | None, bytes]:
    """Hand `view` to the checker in `mode` and answer its reads until it gives its
    verdict or CHECK_SECONDS pass: (whether it finished, whether it started on the
    file, its verdict: "" for a good file, the problem, or None when it ended without
    one; what it sent before a good verdict, at most `_listing_limit` bytes). Each
    piece of `view` sent goes into `pieces`, if given, and each dataset's place the
    checker sends (`_list`) to `found`, if given (`_verdict`); an error `found` raises
    is raised once the checker gave its verdict, so that it can take the next file."""
    reader = _Reader(from_child, time.monotonic() + CHECK_SECONDS)
    started = False
    sent = b""
    failure: Exception | None = None
    try:
        _write_all(to_child, _COUNT.pack(len(view)) + mode)
        while True:
            kind = reader.take(1)
            if kind == b"S":
                started = True
            elif kind == b"R":
                offset, length = _REQUEST.unpack(reader.take(_REQUEST.size))
                start = min(offset, len(view))
                piece = view[start : min(offset + length, len(view))]
                if pieces is not None:
                    crc = crc32(piece)
                    if pieces.get(start, (0, 0, crc))[2] != crc:
                        crc = -1  # served twice, changed between: matches no file
                    pieces[start] = (start, len(piece), crc)
                _write_all(to_child, _COUNT.pack(len(piece)))
                _write_all(to_child, piece)
            elif kind == b"D":
                (length,) = _COUNT.unpack(reader.take(_COUNT.size))
                if length > _PLACES_PER_MESSAGE * _PLACE_BYTES:
                    return True, started, f"it sent datasets' places of {length} bytes", b""
                places = reader.take(length)
                if found is not None:
                    use = found
                    try:
                        for place in json.loads(places):
                            use(place)
                    except Exception as error:  # raised with the verdict: the checker is done
                        failure, found = error, None
            elif kind == b"L" and not sent:
                (length,) = _COUNT.unpack(reader.take(_COUNT.size))
                if length > _listing_limit(len(view)):
                    return True, started, f"its listing takes {length} bytes", b""
                sent = reader.take(length)
            elif kind == b"V":
                (length,) = _COUNT.unpack(reader.take(_COUNT.size))
                message = reader.take(min(length, _MESSAGE_BYTES))
                if failure is not None:
                    raise failure
                return True, started, message.decode("utf8", "replace"), sent
            else:
                return True, started, None, b""  # the checker wrote something else
    except TimeoutError:
        return False, started, None, b""
    except (BrokenPipeError, EOFError):
        return True, started, None, b""


def _listing_limit(size: int) -> int:
    """The most bytes the listing of a file of `size` bytes may take: it lists what the
    file holds (names, strings, numbers, shapes), a byte of the file in at most 6 bytes
    of JSON (a byte that is not UTF-8 as \\udcXX), so only a broken checker sends more."""
    return 8 * size + (1 << 20)


class _Reader:
    """Exact reads from the checker's pipe, each by `deadline` (TimeoutError), EOFError
    when the checker closes it first."""

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd, self.deadline = fd, deadline

    def take(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.fd, count - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _refuse(path: str, problem: str) -> None:
    raise CheckpointFormatError(
        f"'{path}' is not a model file candle_ckpt reads: {printable(problem)}; refusing to load it"
    )


def _bytes_of(source: Any, path: str) -> Any:
    """`source` as bytes in memory: itself, or the file it is open on mapped read-only."""
    if not hasattr(source, "fileno"):
        return source
    size = os.fstat(source.fileno()).st_size
    if size == 0:
        _refuse(path, "it is empty")
    return mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ)


def _check_superblock(view: memoryview, path: str) -> None:
    """The superblock h5py writes (version 0, 8-byte addresses and lengths, no driver
    information), naming a root object inside the file, read without the HDF5 library."""
    if len(view) < _SUPERBLOCK.size + 16:
        _refuse(path, f"{len(view)} bytes, shorter than an HDF5 superblock")
    (
        magic,
        version,
        free_space_version,
        root_version,
        _,
        shared_version,
        offset_size,
        length_size,
        _,
        leaf_k,
        internal_k,
        _flags,
        base,
        _free_space,
        end,
        driver,
        _link_name,
        root,
    ) = _SUPERBLOCK.unpack_from(view)
    problem = ""
    if magic != HDF5_MAGIC:
        problem = "it does not start with the HDF5 signature"
    elif (version, free_space_version, root_version, shared_version) != (0, 0, 0, 0):
        problem = f"superblock version {version} (candle_ckpt writes version 0)"
    elif (offset_size, length_size) != (8, 8):
        problem = f"{offset_size}-byte addresses and {length_size}-byte lengths (expected 8)"
    elif not (leaf_k and internal_k) or base != 0 or driver != _UNDEFINED:
        problem = "a superblock with a base address, a driver block or no group node size"
    elif not root < end <= len(view):
        problem = (
            f"the superblock records an end of file at {end} and a root object at "
            f"{root}; the file has {len(view)} bytes"
        )
    if problem:
        _refuse(path, problem)


def child_main() -> None:
    """The checker process (`_child_command`): for each file its parent hands it on
    stdin and stdout (its size and what is asked, then its bytes as asked for), walk
    it and give the verdict, after the listing if asked for it (`_list`); exit when
    the parent closes the pipe or after IDLE_SECONDS without a file.
    Nothing here returns to a caller."""
    sys.stdout = sys.stderr  # the protocol owns file descriptor 1
    with open("/proc/self/statm") as stream:
        mapped = int(stream.read().split()[0]) * mmap.PAGESIZE
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + CHILD_MEMORY_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    while select.select([0], [], [], IDLE_SECONDS)[0]:
        try:
            (size,) = _COUNT.unpack(_read_exactly(0, _COUNT.size))
            mode = _read_exactly(0, 1)
        except EOFError:
            break
        _write_all(1, b"S")
        if mode == _LIST:
            problem, listing = _list(_ServedFile(0, 1, size))
            if not problem:
                _write_all(1, b"L" + _COUNT.pack(len(listing)) + listing)
        else:
            problem = _walk(_ServedFile(0, 1, size))
        message = problem.encode("utf8", "backslashreplace")[:_MESSAGE_BYTES]
        _write_all(1, b"V" + _COUNT.pack(len(message)) + message)
    os._exit(0)


class _ServedFile(io.RawIOBase):
    """In the checker: the parent's file, read through the pipes in blocks of
    _BLOCK_BYTES (kept, up to _CACHED_BLOCKS of them: HDF5 reads its headers in many
    small pieces)."""

    def __init__(self, from_parent: int, to_parent: int, size: int) -> None:
        super().__init__()
        self._in, self._out = from_parent, to_parent
        self._position, self._size = 0, size
        self._blocks: dict[int, bytes] = {}

    def _request(self, offset: int, length: int) -> bytes:
        _write_all(self._out, b"R" + _REQUEST.pack(offset, length))
        (count,) = _COUNT.unpack(_read_exactly(self._in, _COUNT.size))
        return _read_exactly(self._in, count)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        done = 0
        while done < len(target) and self._position < self._size:
            index, within = divmod(self._position, _BLOCK_BYTES)
            block = self._block(index)
            piece = block[within : within + len(target) - done]
            if not piece:
                break
            target[done : done + len(piece)] = piece
            done += len(piece)
            self._position += len(piece)
        return done

    def _block(self, index: int) -> bytes:
        if index not in self._blocks:
            if len(self._blocks) >= _CACHED_BLOCKS:
                self._blocks.clear()
            self._blocks[index] = self._request(index * _BLOCK_BYTES, _BLOCK_BYTES)
        return self._blocks[index]


def _read_exactly(fd: int, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = os.read(fd, count - len(data))
        if not chunk:
            raise EOFError("the parent closed the pipe")
        data += chunk
    return data


def _walk(served: _ServedFile) -> str:
    """In the checker: "" if every object of the file is one candle_ckpt writes, else
    what is wrong with the first that is not."""
    try:
        with h5py.File(served, "r") as f:
            return _walk_objects(f, served.seek(0, io.SEEK_END))
    except Exception as error:  # whatever h5py raises on a damaged file is the answer
        return f"h5py cannot read it ({type(error).__name__}: {str(error)[:300]})"


def _walk_objects(f: h5py.File, size: int) -> str:
    seen = {h5py.h5o.get_info(f.id).addr}
    pending: list[Any] = [f]
    while pending:
        node = pending.pop()
        for name in node.attrs:
            problem = _attribute_problem(node, name, size)
            if problem:
                return problem
        if isinstance(node, h5py.Dataset):
            problem = _dataset_problem(node, size)
            if problem:
                return problem
            continue
        for name in LOOKED_UP:
            _ = name in node
        for name in [*_names_in_attributes(node), *map(str, range(len(node)))]:
            _probe(node, name)
        for name in node:
            link = node.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                return f"'{node.name}/{name}' is a {type(link).__name__} (candle_ckpt writes none)"
            child = node[name]
            if not isinstance(child, (h5py.Group, h5py.Dataset)):
                return f"'{child.name}' is a {type(child).__name__} (candle_ckpt writes none)"
            address = h5py.h5o.get_info(child.id).addr
            if address in seen:
                return f"'{child.name}' is reached twice (candle_ckpt writes a tree)"
            seen.add(address)
            pending.append(child)
    return ""


def _names_in_attributes(node: Any) -> list[str]:
    """The strings `node`'s attributes hold (Keras' layer and weight names, which the
    readers look up as paths under it)."""
    names = []
    for value in node.attrs.values():
        for item in np.atleast_1d(value).ravel()[:100_000]:
            if isinstance(item, bytes):
                item = item.decode("utf8", "replace")
            if isinstance(item, str) and len(item) <= 1024:
                names.append(item)
    return names


def _probe(node: Any, name: str) -> None:
    """Look `name` up under `node` part by part, as `hdf5.group` and `hdf5.dataset` do."""
    for part in name.split("/"):
        if not part or not isinstance(node, h5py.Group):
            return
        if not isinstance(node.get(part, getlink=True), h5py.HardLink):
            return
        node = node[part]


def _attribute_problem(node: Any, name: str, size: int) -> str:
    """What is wrong with attribute `name` of `node`, read in full, or ""."""
    return _attribute(node, name, size)[0]


def _attribute(node: Any, name: str, size: int) -> tuple[str, Any]:
    """(what is wrong with attribute `name` of `node` or "", its value read in full)."""
    attribute = h5py.h5a.open(node.id, name.encode("utf8"))
    dtype = attribute.dtype
    count = int(np.prod(attribute.shape, dtype=object)) if attribute.shape else 1
    where = f"attribute '{name}' of '{node.name}'"
    if count * dtype.itemsize > size:
        return f"{where} declares {count} items, more than the file's {size} bytes hold", None
    string = h5py.check_string_dtype(dtype)
    if dtype.kind not in _NUMBER_KINDS + "S" and (string is None or dtype.kind != "O"):
        return f"{where} is of type {dtype} (candle_ckpt writes numbers and strings)", None
    return "", node.attrs[name]


def _list(served: _ServedFile) -> tuple[str, bytes]:
    """In the checker: ("", the listing of every object of the file as JSON) if every
    object is one candle_ckpt writes, else (what is wrong with the first that is not,
    b""). The datasets' places are sent to the parent as they are found (b"D", in
    batches of _PLACES_PER_MESSAGE), so that it can prepare their values meanwhile
    (`list_model_file`)."""
    places: list[list[Any]] = []

    def send() -> None:
        text = json.dumps(places, separators=(",", ":")).encode("ascii")
        _write_all(1, b"D" + _COUNT.pack(len(text)) + text)
        places.clear()

    def found(place: list[Any]) -> None:
        places.append(place)
        if len(places) == _PLACES_PER_MESSAGE:
            send()

    try:
        with h5py.File(served, "r") as f:
            problem, listing = _list_objects(f, served.seek(0, io.SEEK_END), found)
    except Exception as error:  # whatever h5py raises on a damaged file is the answer
        return f"h5py cannot read it ({type(error).__name__}: {str(error)[:300]})", b""
    if problem:
        return problem, b""
    if places:
        send()
    return "", json.dumps(listing, separators=(",", ":")).encode("ascii")


def _list_objects(
    f: h5py.File, size: int, found: Callable[[list[Any]], None] = lambda place: None
) -> tuple[str, dict[str, Any]]:
    """What `_walk_objects` checks, through h5py's low-level interface, each object
    opened from its group by its own name (no path is looked up), and what
    `_listed_tree` makes the tree of: {"groups": {path: attributes}, "datasets":
    {path: [offset, shape, dtype, attributes]}}, a group listed before its members,
    paths relative to the root ("" is the root). `found([offset, shape, dtype])` is
    called with each dataset that passed its checks."""
    groups: dict[str, Any] = {}
    datasets: dict[str, Any] = {}
    seen = {h5py.h5o.get_info(f.id).addr}
    pending: list[tuple[Any, str]] = [(f.id, "")]
    while pending:
        group, path = pending.pop()
        groups[path] = {}
        if h5py.h5a.get_num_attrs(group):
            problem, groups[path] = _listed_attributes(h5py.Group(group), size)
            if problem:
                return problem, {}
        for name, kind, address in _links(group):
            member = f"{path}/{name.decode('utf8', 'surrogateescape')}".lstrip("/")
            if kind != h5py.h5l.TYPE_HARD:
                link = _LINK_KINDS.get(kind, f"a link of type {kind}")
                return f"'/{member}' is {link} (candle_ckpt writes none)", {}
            if address in seen:
                return f"'/{member}' is reached twice (candle_ckpt writes a tree)", {}
            seen.add(address)
            opened = h5py.h5o.open(group, name)
            if isinstance(opened, h5py.h5g.GroupID):
                pending.append((opened, member))
                continue
            if not isinstance(opened, h5py.h5d.DatasetID):
                return f"'/{member}' is a {type(opened).__name__} (candle_ckpt writes none)", {}
            problem, offset, shape = _stored(opened, f"dataset '/{member}'", size, True)
            attributes: dict[str, Any] = {}
            if not problem and h5py.h5a.get_num_attrs(opened):
                problem, attributes = _listed_attributes(h5py.Dataset(opened), size)
            if problem:
                return problem, {}
            datasets[member] = [offset, shape, opened.dtype.str, attributes]
            found(datasets[member][:3])
    return "", {"groups": groups, "datasets": datasets}


def _links(group: Any) -> list[tuple[bytes, int, int]]:
    """(name, link type, address for a hard link) of every link of the GroupID `group`."""
    links: list[tuple[bytes, int, int]] = []
    # h5py hands the callback one LinkInfo, overwritten link by link: copied at once
    group.links.iterate(lambda name, info: links.append((name, info.type, info.u)), info=True)
    return links


_LINK_KINDS = {h5py.h5l.TYPE_SOFT: "a SoftLink", h5py.h5l.TYPE_EXTERNAL: "an ExternalLink"}

_LISTED_STRING_BYTES = 64 << 10
"""A longer string attribute (Keras' model_config) is checked but left out of the
listing: the readers of listings read names and numbers."""


def _listed_attributes(node: Any, size: int) -> tuple[str, dict[str, Any]]:
    """(what is wrong with an attribute of `node` or "", its attributes as the listing
    holds them: `_listed_value`, those it leaves out omitted)."""
    listed = {}
    for name in node.attrs:
        problem, value = _attribute(node, name, size)
        if problem:
            return problem, {}
        entry = _listed_value(value)
        if entry is not None:
            listed[name] = entry
    return "", listed


def _listed_value(value: Any) -> list[Any] | None:
    """An attribute's value as [kind, value] ("s" strings, "b" booleans, "i" integers,
    "f" floats: one, or a list of them), or None for what a listing leaves out (complex
    numbers, a string longer than _LISTED_STRING_BYTES)."""
    array = np.asarray(value)
    if array.dtype.kind in "SOU":
        items = [
            item.decode("utf8", "surrogateescape") if isinstance(item, bytes) else str(item)
            for item in array.ravel().tolist()
        ]
        if any(len(item) > _LISTED_STRING_BYTES for item in items):
            return None
        return ["s", items[0] if array.ndim == 0 else items]
    if array.dtype.kind == "c":
        return None
    kind = {"b": "b", "i": "i", "u": "i"}.get(array.dtype.kind, "f")
    return [kind, array.tolist()]


def _dataset_problem(dataset: h5py.Dataset, size: int) -> str:
    """What is wrong with how `dataset` is stored, or "" (`_stored`)."""
    return _stored(dataset.id, f"dataset '{dataset.name}'", size)[0]


def _stored(
    dataset: Any, where: str, size: int, by_offset: bool = False
) -> tuple[str, int, tuple[int, ...]]:
    """(what is wrong with how the dataset `dataset` (an h5py DatasetID, named `where`)
    is stored or "", the offset of its values in the file, its shape): its values must
    be numbers in this machine's byte order, stored uncompressed as one run of bytes
    in the file.

    `by_offset`: for a reader that takes the values from the file's bytes at that
    offset (a listing), never through HDF5. HDF5 gives a dataset's offset only for
    contiguous storage in the file itself (not chunked, compact, virtual or external),
    and applies a filter pipeline to chunked data only, so the creation properties are
    read only for a dataset without an offset, to say what it is.
    """
    dtype = dataset.dtype
    if dtype.kind not in _NUMBER_KINDS or not dtype.isnative:
        problem = (
            f"{where} holds {dtype.str} values (candle_ckpt writes numbers in native byte order)"
        )
        return problem, 0, ()
    offset = dataset.get_offset()
    if not (by_offset and offset is not None):
        plist = dataset.get_create_plist()
        layout = plist.get_layout()
        if layout != h5py.h5d.CONTIGUOUS:
            kinds = {h5py.h5d.COMPACT: "compact", h5py.h5d.CHUNKED: "chunked"}
            kind = kinds.get(layout, "virtual")
            return f"{where} is {kind} (candle_ckpt writes contiguous datasets)", 0, ()
        if plist.get_nfilters() or plist.get_external_count():
            return f"{where} is filtered (compressed) or stored in other files", 0, ()
    shape = dataset.shape
    if shape is None:
        return f"{where} has no dataspace", 0, ()
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return "", 0, shape
    stored = dataset.get_storage_size()
    if offset is None or stored != nbytes or offset + nbytes > size:
        return (
            f"{where} declares {nbytes} bytes, not stored whole inside the file "
            f"({size} bytes; at offset {offset}, {stored} stored)",
            0,
            (),
        )
    return "", offset, shape


# -- JSON held in a model file ---------------------------------------------------------

MAX_JSON_DEPTH = 64
"""How deeply a model file's JSON may nest arrays and objects."""

# One string JSON encodes in at most this many bytes, then any other text: a string of
# more bytes leaves a quote behind when these are taken out.
_SHORT_STRINGS = {
    limit: re.compile(rb'"(?:[^"\\]|\\.){0,%d}"' % limit) for limit in (4096, 1 << 20)
}
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def load_json(text: bytes, path: str, what: str, max_string: int = 4096) -> Any:
    """The JSON `text` (`what` of the model file `path`) parsed, once it is found to
    nest at most MAX_JSON_DEPTH deep and to hold no string longer than `max_string`
    bytes as encoded (4096 or 1 MiB): checked in one pass over the text, in memory
    proportional to it, so that a text that fails is refused before it is parsed and
    one that is parsed decodes to objects in proportion to its size.

    Raises:
        CheckpointFormatError: the text is not UTF-8 JSON, or exceeds those bounds.
    """
    where = f"'{path}': {what}"
    stripped = _SHORT_STRINGS[max_string].sub(b"", text)
    if b'"' in stripped:
        raise CheckpointFormatError(
            f"{where} holds a string longer than {max_string} bytes (or is not JSON); "
            f"candle_ckpt writes none"
        )
    depth = _depth(stripped.translate(None, _NOT_BRACKETS))
    if depth > MAX_JSON_DEPTH:
        raise CheckpointFormatError(
            f"{where} nests {depth} levels deep; candle_ckpt reads at most {MAX_JSON_DEPTH}"
        )
    try:
        return json.loads(text.decode("utf8"))
    except (ValueError, RecursionError) as error:
        raise CheckpointFormatError(f"{where} is not UTF-8 JSON: {error}") from None


def _depth(brackets: bytes) -> int:
    """The deepest nesting of a run of JSON brackets, counted in slices of 1 MiB."""
    deepest, level = 0, 0
    for start in range(0, len(brackets), 1 << 20):
        piece = np.frombuffer(brackets, np.uint8, min(1 << 20, len(brackets) - start), start)
        steps = np.where((piece == ord("[")) | (piece == ord("{")), 1, -1).astype(np.int32)
        levels = np.cumsum(steps, dtype=np.int64) + level
        deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest
