"""`candle-ckpt export`: one epoch's weights as a file plain Keras or PyTorch loads.

The epoch is verified first (every file's size and CRC32, `core.restore.verify`); its model file
is converted from the verified bytes, so what is exported is exactly what was checked:

- a Keras tree (or an upstream CANDLE Keras file): Keras 3's `.weights.h5`, written
  with h5py alone (`candle_ckpt.keras.weights_h5`; no TensorFlow or Keras import), for
  ``model.load_weights(PATH)``;
- a PyTorch tree (or an upstream CANDLE torch pickle): the model's state dict written by
  `torch.save` (torch is imported for this only), for
  ``net.load_state_dict(torch.load(PATH, weights_only=True))``.

The file is written under a temporary name in the destination's directory, fsynced and
renamed over PATH (`core.storage.durable`); then ``PATH.sha256`` (sha256sum's format) is written
atomically. Any old ``PATH.sha256`` is removed before PATH is replaced, so a kill at any
instant leaves PATH whole (old or new) and never a digest file that does not match it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

from ..core.errors import CheckpointError, CheckpointFormatError, CorruptCheckpointError
from ..core.format.layout import CheckpointLayout
from ..core.restore.verify import check_epoch
from ..core.storage.durable import (
    fsync_file,
    remove_link,
    rename_durable,
    temporary_name,
    write_bytes_atomic,
)
from ..core.storage.faults import fault_point

KERAS_SUFFIX = ".weights.h5"
DIGEST_SUFFIX = ".sha256"


@dataclass(frozen=True)
class Exported:
    """What `export_epoch` wrote: the file, its SHA-256, and what it holds."""

    path: str
    sha256: str
    framework: str  # "keras" or "pytorch"
    what: str  # e.g. "12 weight arrays", "state dict of 'model'"
    unverified: tuple[str, ...]  # files that had no recorded CRC32 (size checked only)


def export_epoch(
    layout: CheckpointLayout, epoch: int, destination: str, *, force: bool = False
) -> Exported:
    """Verify epoch `epoch` of `layout`, then write its weights at `destination`.

    Raises:
        CorruptCheckpointError: a file of the epoch is missing or fails its size or
            CRC32 check (nothing is written).
        CheckpointError: an invalid ckpt-info.json, a model that cannot be exported
            exactly, or a destination that exists (without `force`), lies in no
            existing directory or has the wrong suffix for Keras.
    """
    directory = layout.epoch_dir(epoch)
    check = check_epoch(layout, epoch, verify_checksums=True, hold_model_contents=True)
    info, results = check.info, check.files
    try:
        check.raise_if_bad()
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(
            f"epoch {epoch} fails verification ({error}); nothing was exported. Export an "
            f"epoch that verifies ('candle-ckpt list --verify {layout.root}' shows which)"
        ) from error
    source = os.path.join(directory, info["model_file"])
    contents = next(r.contents for r in results if r.contents is not None)
    framework = _framework(info, contents, source)
    destination = os.path.abspath(destination)
    _check_destination(destination, framework, force)
    temporary = temporary_name(destination)
    try:
        what = _write(framework, contents, source, temporary)
        fsync_file(temporary)
        digest = _sha256(temporary)
        fault_point("export_written")
        remove_link(destination + DIGEST_SUFFIX)  # an unlink made durable, for any file
        fault_point("export_digest_removed")
        rename_durable(temporary, destination)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
    fault_point("export_renamed")
    write_bytes_atomic(
        destination + DIGEST_SUFFIX, f"{digest}  {os.path.basename(destination)}\n".encode()
    )
    return Exported(
        destination,
        digest,
        framework,
        what,
        tuple(r.path for r in results if r.expected_crc32 is None),
    )


def _framework(info: dict, contents: memoryview, source: str) -> str:
    """ "keras" or "pytorch": the adapter recorded in ckpt-info.json, else (upstream CANDLE
    and older trees) what the model file is: Keras' legacy HDF5 layout has
    `model_weights` or `layer_names`; other HDF5 is ours for PyTorch, and a file that
    is not HDF5 is upstream's torch pickle."""
    adapter = info.get("adapter")
    if adapter in ("keras", "pytorch"):
        return adapter
    if adapter is not None:
        raise CheckpointFormatError(
            f"ckpt-info.json records adapter {adapter!r}; export knows 'keras' and 'pytorch'"
        )
    # Only here: list, info and verify never need h5py
    from ..hdf5 import HDF5_MAGIC
    from ..hdf5_check import errors_are_the_files, open_model_file

    if bytes(contents[: len(HDF5_MAGIC)]) != HDF5_MAGIC:
        return "pytorch"
    with errors_are_the_files(source, "readable HDF5"), open_model_file(contents, source) as f:
        keras_file = "model_weights" in f or "layer_names" in f.attrs
    return "keras" if keras_file else "pytorch"


def _check_destination(destination: str, framework: str, force: bool) -> None:
    if framework == "keras" and not destination.endswith(KERAS_SUFFIX):
        raise CheckpointError(
            f"--to '{destination}': Keras' load_weights reads a weights "
            f"file only under a name ending in '{KERAS_SUFFIX}'; name it "
            f"e.g. '{os.path.splitext(destination)[0]}{KERAS_SUFFIX}'"
        )
    parent = os.path.dirname(destination)
    if not os.path.isdir(parent):
        raise CheckpointError(
            f"--to '{destination}': directory '{parent}' does not exist; create it first"
        )
    if os.path.isdir(destination):
        raise CheckpointError(f"--to '{destination}' is a directory; expected a file name")
    if os.path.lexists(destination) and not force:
        raise CheckpointError(f"--to '{destination}' exists; pass --force to replace it")


def _write(framework: str, contents: memoryview, source: str, temporary: str) -> str:
    if framework == "keras":
        from ..keras.weights_h5 import write_weights_h5

        return f"{write_weights_h5(contents, source, temporary)} weight arrays"
    try:
        from ..pytorch.state import write_module_weights
    except ImportError as error:
        raise CheckpointError(
            f"'{source}' is a PyTorch checkpoint; exporting it needs "
            f"torch, which is not installed ({error})"
        ) from None
    return f"state dict of '{write_module_weights(contents, source, temporary)}'"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def print_exported(exported: Exported, epoch: int) -> None:
    """The command's output: what was written, and the digest as sha256sum prints it."""
    for path in exported.unverified:
        print(
            f"warning: {path} has no recorded CRC32 (saved with ckpt_checksum=false): "
            f"its size was checked, not its contents",
            file=sys.stderr,
        )
    print(
        f"epoch {epoch}: exported {exported.what} ({exported.framework}) to "
        f"{exported.path}, digest in {exported.path}{DIGEST_SUFFIX}"
    )
    print(f"{exported.sha256}  {exported.path}")
